// The playground form: the note under the job choice says whether prompts to the chosen adapter are
// blurred (its job's hidden-state noise) before a prompt is sent. The notes come from the server
// (the "noise-notes" JSON: job id, or "" for the base model only -> text); all text goes in with textContent.
(function () {
  "use strict";

  const jobSelect = document.getElementById("id_job");
  const hint = document.getElementById("noise-hint");
  const source = document.getElementById("noise-notes");
  if (!jobSelect || !hint || !source) {
    return;
  }
  const notes = JSON.parse(source.textContent);

  function show() {
    const note = notes[jobSelect.value];
    hint.textContent = note !== undefined ? note : notes[""];
  }

  jobSelect.addEventListener("change", show);
  show();
})();
