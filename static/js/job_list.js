// The job list, live from /ws/jobs/ (the user's own jobs only): a job created elsewhere (the API, another
// tab) gets its row, and each row's status, progress and loss follow as the job's steps land.
(function () {
  "use strict";
  const table = document.getElementById("job-table");
  if (!table || typeof WebSocket === "undefined") return;
  const body = table.tBodies[0];
  const count = (n) => Number(n).toLocaleString("en-US"); // "65,733", as the server writes counts
  let retries = 0;

  function cell(className) {
    const td = document.createElement("td");
    if (className) td.className = className;
    return td;
  }

  // A row like the server's (templates/training/job_list.html), newest first.
  function addRow(event) {
    const row = document.createElement("tr");
    row.dataset.job = String(event.job);
    const name = cell();
    const link = document.createElement("a");
    link.href = event.url;
    link.textContent = event.name;
    const number = document.createElement("span");
    number.className = "muted";
    number.textContent = `#${event.job}`;
    name.append(link, " ", number);
    const dataset = cell();
    dataset.textContent = event.dataset_name || "";
    const model = cell();
    model.textContent = event.base_model || "";
    const status = cell("status-cell");
    const badge = document.createElement("span");
    badge.className = "status";
    status.append(badge);
    const created = cell("muted");
    if (event.created_at && window.splitlearnTimes) created.append(window.splitlearnTimes.element(event.created_at, "minute"));
    const loss = cell("loss-cell");
    loss.textContent = "–";
    row.append(name, dataset, model, status, cell("progress-cell"), loss, created);
    const newer = Array.from(body.rows).find((other) => Number(other.dataset.job) < event.job);
    body.insertBefore(row, newer || null);
    table.hidden = false;
    const empty = document.getElementById("jobs-empty");
    if (empty) empty.remove();
    return row;
  }

  function showProgress(row, event) {
    // A status event may carry a step behind the last progress event; a queued job starts over from its checkpoint.
    const shown = Number(row.dataset.step || 0);
    if (event.current_step < shown && event.status !== "queued") return;
    row.dataset.step = String(event.current_step);
    row.querySelector(".progress-cell").textContent =
      event.total_steps ? `${count(event.current_step)} / ${count(event.total_steps)}` : count(event.current_step);
    if (event.last_loss != null) row.querySelector(".loss-cell").textContent = event.last_loss.toFixed(4);
  }

  function update(event) {
    const row = body.querySelector(`tr[data-job="${event.job}"]`) || addRow(event);
    const badge = row.querySelector(".status-cell .status");
    badge.textContent = event.status_display || event.status;
    badge.className = "status status-" + event.status;
    const link = row.querySelector("td a");
    if (link && event.name) link.textContent = event.name;
    showProgress(row, event);
  }

  function progress(event) {
    const row = body.querySelector(`tr[data-job="${event.job}"]`);
    if (row) showProgress(row, event); // a row arrives with its job's status event
  }

  function connect() {
    const scheme = location.protocol === "https:" ? "wss" : "ws";
    const socket = new WebSocket(`${scheme}://${location.host}/ws/jobs/`);
    socket.onopen = () => { retries = 0; };
    socket.onmessage = (message) => {
      const event = JSON.parse(message.data);
      if (event.type === "status") update(event);
      else if (event.type === "progress") progress(event);
    };
    socket.onclose = (close) => {
      if (close.code === 4401) return;
      retries += 1;
      setTimeout(connect, Math.min(30000, 500 * Math.pow(2, retries)));
    };
  }
  connect();
})();
