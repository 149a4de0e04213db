// Live statuses on the job list, from /ws/jobs/ (the user's own jobs only).
(function () {
  "use strict";
  if (typeof WebSocket === "undefined") return;
  let retries = 0;

  function update(event) {
    const row = document.querySelector(`tr[data-job="${event.job}"]`);
    if (!row) return; // a job created elsewhere appears on the next visit
    const badge = row.querySelector(".status-cell .status");
    badge.textContent = event.status_display || event.status;
    badge.className = "status status-" + event.status;
    row.querySelector(".progress-cell").textContent =
      event.total_steps ? `${event.current_step} / ${event.total_steps}` : String(event.current_step);
    if (event.last_loss != null) row.querySelector(".loss-cell").textContent = event.last_loss.toFixed(4);
  }

  function connect() {
    const scheme = location.protocol === "https:" ? "wss" : "ws";
    const socket = new WebSocket(`${scheme}://${location.host}/ws/jobs/`);
    socket.onopen = () => { retries = 0; };
    socket.onmessage = (message) => {
      const event = JSON.parse(message.data);
      if (event.type === "status") update(event);
    };
    socket.onclose = (close) => {
      if (close.code === 4401) return;
      retries += 1;
      setTimeout(connect, Math.min(30000, 500 * Math.pow(2, retries)));
    };
  }
  connect();
})();
