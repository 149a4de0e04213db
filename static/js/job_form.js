// The job form: a preset sets the run length; the estimate of steps and duration follows every choice;
// a note says when the job will run on a chain of trunks.
//
// The steps are counted as the trainer counts them (webapp/training/estimates.py); the duration comes
// from step times measured on recent jobs of the same base model (on the same trunk when one is chosen).
(function () {
  "use strict";
  const source = document.getElementById("job-estimate-data");
  const out = document.getElementById("job-estimate");
  if (!source || !out) return;
  const data = JSON.parse(source.textContent);
  const form = out.closest("form");
  const RUN_LENGTH = ["epochs", "max_steps", "learning_rate"];
  const DAY_S = 24 * 3600; // an estimate above this warns and says how to train for less
  const count = (n) => Number(n).toLocaleString("en-US"); // "87,643", as the server writes counts
  let applying = false;

  function value(name) {
    const field = form.elements[name];
    return field ? field.value : "";
  }

  function number(name) {
    const raw = value(name);
    return raw === "" ? null : Number(raw);
  }

  function preset() {
    const checked = form.querySelector("input[name=preset]:checked");
    return checked ? data.presets[checked.value] || null : null;
  }

  function setField(name, newValue) {
    const field = form.elements[name];
    if (field) field.value = newValue;
  }

  function applyPreset() {
    const chosen = preset();
    if (!chosen) return;
    applying = true;
    setField("epochs", String(chosen.epochs));
    setField("learning_rate", String(chosen.learning_rate));
    setField("max_steps", "");
    applying = false;
  }

  function toCustom() {
    if (applying) return;
    const custom = form.querySelector("input[name=preset][value=custom]");
    if (custom && !custom.checked) custom.checked = true;
  }

  function trainingExamples(examples, valFraction) {
    const heldOut = valFraction > 0 ? Math.max(1, Math.round(examples * valFraction)) : 0;
    return Math.max(0, examples - heldOut);
  }

  function duration(seconds) {
    if (seconds < 60) return `${Math.max(1, Math.round(seconds))} s`;
    const minutes = Math.round(seconds / 60);
    if (minutes < 60) return `${minutes} min`;
    const hours = Math.floor(minutes / 60);
    return `${hours} h ${minutes % 60} min`;
  }

  let longRun = false; // whether the last estimate was over a day (the paragraph then reads as a warning)

  function estimate() {
    longRun = false;
    const dataset = data.datasets[value("dataset")];
    if (!dataset) return "Choose a dataset to see how many steps the job will run.";
    const batch = number("batch_size"), accum = number("grad_accum_steps");
    const valFraction = number("val_fraction") || 0;
    if (!(batch >= 1 && accum >= 1)) return "Set the batch size and gradient accumulation to see the steps.";
    const perStep = batch * accum;
    const train = trainingExamples(dataset.examples, valFraction);
    const maxSteps = number("max_steps");
    const epochs = number("epochs") || 1;
    const stepsFor = (passes) => Math.max(1, Math.ceil(passes * train / perStep));
    const steps = maxSteps ? maxSteps : stepsFor(epochs);
    const how = maxSteps ? `${count(steps)} steps` :
      `${count(steps)} steps (${epochs} epoch${epochs === 1 ? "" : "s"} of ${count(train)} training examples, ` +
      `${count(perStep)} per step)`;
    if (steps > data.max_steps) {
      return `${how}: more than the ${count(data.max_steps)} steps a job may run.`;
    }
    const model = value("base_model"), trunk = value("trunk");
    const rates = data.rates[model] || {};
    const rate = (trunk && rates[trunk]) || rates.any;
    if (!rate) {
      return `${how}. No job has run on ${model} yet, so there is no measured step time: ` +
        "the job's page shows the time left once its first steps are done.";
    }
    const secondsFor = (n) => (rate.startup_s || 0) + n * perStep * rate.seconds_per_example;
    const seconds = secondsFor(steps);
    const where = trunk && rates[trunk] ? `on ${data.trunks[trunk]}` : `on ${model}`;
    const text = `${how}, about ${duration(seconds)}: measured on ${rate.jobs} recent job${rate.jobs === 1 ? "" : "s"} ` +
      `${where}.`;
    if (seconds <= DAY_S) return text;
    longRun = true;
    return `${text} ${longRunAdvice(steps, maxSteps, secondsFor, stepsFor)}`;
  }

  // Over a day: the shortest preset that is shorter (when it is), and the max steps that fit in a day.
  function longRunAdvice(steps, maxSteps, secondsFor, stepsFor) {
    const options = [];
    const shortest = Object.values(data.presets).sort((a, b) => a.epochs - b.epochs)[0];
    if (shortest && (maxSteps || stepsFor(shortest.epochs) < steps)) {
      options.push(`choose ${shortest.label} (about ${duration(secondsFor(stepsFor(shortest.epochs)))})`);
    }
    const perDay = Math.floor(DAY_S / Math.max(1e-9, secondsFor(1) - secondsFor(0)));
    if (perDay >= 1) options.push(`set max steps to ${count(perDay)} or fewer under Advanced (about 24 h)`);
    return `That is more than a day of training: ${options.join(", or ") || "train on fewer examples"}.`;
  }

  // The server's note on a chain of trunks (training/forms.py: chain_notes), for the cut it was computed at;
  // another cut is placed when the form is sent.
  const chainSource = document.getElementById("job-chain-notes");
  const chainNote = document.getElementById("chain-note");
  const chains = chainSource ? JSON.parse(chainSource.textContent) : null;

  function cutField(name) {
    const raw = value(name);
    return raw === "" ? null : Number(raw);
  }

  function updateChainNote() {
    if (!chains || !chainNote) return;
    const sameCut = cutField("bottom_layers") === chains.cut[0] && cutField("top_layers") === chains.cut[1];
    const note = sameCut && !value("trunk") ? chains.notes[value("base_model")] || "" : "";
    chainNote.textContent = note;
    chainNote.hidden = !note;
  }

  function update() {
    out.textContent = estimate();
    out.classList.toggle("warning", longRun);
    updateChainNote();
  }

  form.querySelectorAll("input[name=preset]").forEach((radio) => {
    radio.addEventListener("change", () => { applyPreset(); update(); });
  });
  RUN_LENGTH.forEach((name) => {
    const field = form.elements[name];
    if (field) field.addEventListener("input", toCustom);
  });
  // DoRA and rsLoRA are LoRA's flags: off and greyed out for the other methods (the server refuses them too).
  function methodFlags() {
    const method = form.elements.adapter_method;
    if (!method) return;
    ["use_dora", "use_rslora"].forEach((name) => {
      const flag = form.elements[name];
      if (!flag) return;
      flag.disabled = method.value !== "lora";
      if (flag.disabled) flag.checked = false;
    });
  }

  if (form.elements.adapter_method) form.elements.adapter_method.addEventListener("change", methodFlags);
  form.addEventListener("input", update);
  form.addEventListener("change", update);
  applyPreset();
  methodFlags();
  update();
  window.jobForm = { estimate: estimate }; // for tests and the console
})();
