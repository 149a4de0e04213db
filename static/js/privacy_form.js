// The job form's Privacy group: what the chosen setting let a trunk owner read when it was measured.
(function () {
  "use strict";
  const data = document.getElementById("privacy-points");
  const out = document.getElementById("privacy-measured");
  if (!data || !out) return;
  const measured = JSON.parse(data.textContent);
  const points = measured.points;
  const baseline = points[0];
  const form = out.closest("form");
  const FIELDS = ["bottom_layers", "top_layers", "hidden_noise", "grad_noise", "nopeek", "private_bottom",
                  "gradients_to_trunk"];

  function number(name, fallback) {
    const field = form.elements[name];
    const value = field && field.value !== "" ? Number(field.value) : fallback;
    return Number.isFinite(value) ? value : NaN;
  }

  function chosen() {
    const gradients = form.elements.gradients_to_trunk;
    return {
      n_bottom: number("bottom_layers", baseline.n_bottom), n_top: number("top_layers", baseline.n_top),
      hidden_noise: number("hidden_noise", 0), grad_noise: number("grad_noise", 0), nopeek: number("nopeek", 0),
      private_bottom: number("private_bottom", 0), gradients_to_trunk: !gradients || gradients.value !== "false",
    };
  }

  function matches(point, setting) {
    const p = point.privacy;
    return point.n_bottom === setting.n_bottom && point.n_top === setting.n_top &&
      p.hidden_noise === setting.hidden_noise && p.grad_noise === setting.grad_noise && p.nopeek === setting.nopeek &&
      p.private_bottom === setting.private_bottom && p.gradients_to_trunk === setting.gradients_to_trunk;
  }

  function show() {
    const setting = chosen();
    const index = points.findIndex((point) => matches(point, setting));
    document.querySelectorAll("#privacy-table tr[data-point]").forEach((row) => {
      row.classList.toggle("chosen", Number(row.dataset.point) === index);
    });
    if (index < 0) {
      out.textContent = "This exact setting was not measured; the table below has the settings that were. " +
        "The job's own audit will say what the trunk could read of your data.";
      return;
    }
    const point = points[index];
    out.textContent = `Measured on ${measured.model} for this setting (${point.name}): the best attack read ` +
      `${point.hidden_percent} of the tokens from the hidden states and ${point.gradient_percent} of the labels ` +
      `from the gradients; validation loss ${point.cost} against an undefended run.` +
      (point.strong_audit ? "" : " (An earlier audit, without the stronger attacks: they would read at least as much.)");
  }

  // The measured figures and the recommended start are for one model; another model starts undefended.
  function onModelChange() {
    const model = form.elements.base_model ? form.elements.base_model.value : measured.model;
    ["privacy-default", "privacy-ceiling"].forEach((id) => {
      const note = document.getElementById(id);
      if (note) note.hidden = model !== measured.model;
    });
    if (model === measured.model || measured.recommended === null) return;
    const recommended = points[measured.recommended].privacy;
    FIELDS.forEach((name) => {
      const field = form.elements[name];
      if (!field) return;
      const value = recommended[name];
      const same = name === "gradients_to_trunk" ? (field.value !== "false") === value
        : (field.value === "" ? null : Number(field.value)) === value;
      if (!same) return;  // the user changed it: keep their choice
      if (name === "gradients_to_trunk") field.value = "true";
      else if (name === "bottom_layers" || name === "top_layers") field.value = "";
      else field.value = "0";
    });
    show();
  }
  if (form.elements.base_model) form.elements.base_model.addEventListener("change", onModelChange);

  FIELDS.forEach((name) => {
    const field = form.elements[name];
    if (field) field.addEventListener("input", show);
    if (field) field.addEventListener("change", show);
  });
  show();
})();
