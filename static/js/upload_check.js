// The dataset upload form refuses a file over the site's upload limit before sending it: the limit is the
// form's data-max-bytes (the server's DATASET_MAX_UPLOAD_BYTES), so a large file is not transferred only to
// be refused. The server checks again whatever arrives.
(function () {
  "use strict";

  var UNITS = ["KiB", "MiB", "GiB", "TiB", "PiB"];

  // Binary units with one decimal when it has one, as webapp/byte_sizes.py writes them: "54.5 MiB".
  function formatBytes(size) {
    if (size < 1024) return size.toLocaleString("en") + " B";
    var value = size, unit = UNITS[0];
    for (var i = 0; i < UNITS.length; i++) {
      value /= 1024;
      unit = UNITS[i];
      if (value < 1023.95) break;
    }
    return value.toFixed(1).replace(/\.0$/, "").replace(/\B(?=(\d{3})+(?!\d))/, ",") + " " + unit;
  }

  function refusalFor(form) {
    var limit = Number(form.dataset.maxBytes);
    var input = form.querySelector("input[type=file]");
    var file = input && input.files && input.files[0];
    if (!file || !(limit > 0) || file.size <= limit) return "";
    var size = formatBytes(file.size), limitWords = form.dataset.maxWords || formatBytes(limit);
    if (size === limitWords) {  // just over the limit: rounding would hide the difference
      size = file.size.toLocaleString("en") + " bytes";
      limitWords = limit.toLocaleString("en") + " bytes";
    }
    return file.name + ": the file is " + size + ", over the upload limit of " + limitWords +
      "; split it into smaller files. Nothing was uploaded.";
  }

  function show(form) {
    var message = refusalFor(form);
    var place = form.querySelector("[data-upload-refusal]");
    if (place) {
      place.textContent = message;
      place.hidden = !message;
    }
    return message;
  }

  document.querySelectorAll("form[data-max-bytes]").forEach(function (form) {
    var input = form.querySelector("input[type=file]");
    if (input) input.addEventListener("change", function () { show(form); });
    form.addEventListener("submit", function (event) {
      if (show(form)) event.preventDefault();
    });
  });
})();
