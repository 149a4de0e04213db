// One way to show a date and time on every page: in the browser's time zone, 24-hour,
// "2026-12-02 14:05:09" (or "14:05:09" for log lines, "2026-12-02 14:05" in lists).
// The server renders <time datetime="ISO"> with the same format in the site's time zone;
// this rewrites them in the reader's zone and puts the zone in the tooltip.
(function () {
  "use strict";
  const pad = (n) => String(n).padStart(2, "0");
  const zone = (Intl.DateTimeFormat().resolvedOptions().timeZone) || "local time";

  function day(date) {
    return `${date.getFullYear()}-${pad(date.getMonth() + 1)}-${pad(date.getDate())}`;
  }

  function clock(date) {
    return `${pad(date.getHours())}:${pad(date.getMinutes())}:${pad(date.getSeconds())}`;
  }

  function format(date, style) {
    if (!(date instanceof Date) || isNaN(date.getTime())) return "–";
    if (style === "time") return clock(date);
    if (style === "minute") return `${day(date)} ${clock(date).slice(0, 5)}`;
    return `${day(date)} ${clock(date)}`;
  }

  // A <time> element for `iso` in `style` (see format), as the server renders it.
  function element(iso, style) {
    const node = document.createElement("time");
    node.dateTime = iso;
    if (style) node.dataset.format = style;
    show(node);
    return node;
  }

  function show(node) {
    const date = new Date(node.getAttribute("datetime"));
    if (isNaN(date.getTime())) return;
    node.textContent = format(date, node.dataset.format);
    node.title = `${format(date)} (${zone})`;
  }

  function localise(root) {
    (root || document).querySelectorAll("time[datetime]").forEach(show);
  }

  window.splitlearnTimes = { format: format, element: element, localise: localise, zone: zone };
  localise(document);
})();
