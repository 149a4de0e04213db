// The job form's line on the split of compute: how many blocks, and what share of each step's matmul work, the cut
// in the form leaves on the user's workers. It says what webapp/training/compute.py (cut_words) says on the server,
// from the same figures: each model's work per block and LM head, and the trunks' default cuts.
(function () {
  "use strict";
  const source = document.getElementById("job-compute-data");
  const out = document.getElementById("compute-share");
  if (!source || !out) return;
  const data = JSON.parse(source.textContent);
  const form = out.closest("form");

  function value(name) {
    const field = form.elements[name];
    return field ? field.value : "";
  }

  function cutField(name) {
    const raw = value(name).trim();
    if (raw === "") return null;
    const number = Number(raw);
    return Number.isInteger(number) ? number : NaN;
  }

  function sum(values) {
    return values.reduce((total, each) => total + each, 0);
  }

  // As splitcore.model.compute_share.ComputeShare.describe().
  function describe(model, nBottom, nTop) {
    const blocks = model.block_macs, total = blocks.length;
    const client = sum(blocks.slice(0, nBottom)) + sum(blocks.slice(total - nTop)) + model.head_macs;
    const share = client / (sum(blocks) + model.head_macs);
    return `your workers run ${nBottom + nTop} of ${total} blocks and the LM head ` +
      `(${Math.round(share * 100)}% of a step's compute); the trunk runs ${total - nBottom - nTop}`;
  }

  function defaultCut(modelId, model) {
    const trunk = data.trunks[value("trunk")];
    return trunk && trunk.model === modelId ? trunk.default_cut : model.default_cut;
  }

  function words() {
    const modelId = value("base_model");
    const model = data.models[modelId];
    if (!model) return "";
    let nBottom = cutField("bottom_layers"), nTop = cutField("top_layers");
    let lead = "At this cut";
    if (nBottom === null || nTop === null) {
      const fallback = defaultCut(modelId, model);
      if (!fallback) {
        return "Empty cut fields take the default of the trunk the job gets, which is not known here: fill in " +
          "both to see how much of each step runs on your workers.";
      }
      if (nBottom === null && nTop === null) {
        lead = `At the trunk's default cut, ${fallback[0]} blocks before it and ${fallback[1]} after it,`;
      } else if (nBottom === null) {
        lead = `With the trunk's default of ${fallback[0]} blocks before it,`;
      } else {
        lead = `With the trunk's default of ${fallback[1]} blocks after it,`;
      }
      if (nBottom === null) nBottom = fallback[0];
      if (nTop === null) nTop = fallback[1];
    }
    const total = model.block_macs.length;
    if (!(nBottom >= 1 && nTop >= 1 && nBottom + nTop < total)) {
      return `${modelId} has ${total} blocks: keep at least 1 before the trunk and 1 after it, and at most ` +
        `${total - 1} in all, so the trunk runs at least one.`;
    }
    return `${lead} ${describe(model, nBottom, nTop)}.`;
  }

  function update() {
    const text = words();
    out.textContent = text;
    out.hidden = !text;
  }

  ["bottom_layers", "top_layers", "base_model", "trunk"].forEach((name) => {
    const field = form.elements[name];
    if (!field) return;
    field.addEventListener("input", update);
    field.addEventListener("change", update);
  });
  update();
  window.computeShare = { words: words }; // for tests and the console
})();
