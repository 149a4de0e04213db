// Live job page: the chart, progress and log tail, fed by /ws/jobs/<id>/.
// On (re)connect the server replays the stored history (after ?after=STEP), then streams
// new events. Points are keyed by (kind, step), so a replay never duplicates a point.
(function () {
  "use strict";
  const root = document.getElementById("job-live");
  if (!root || typeof WebSocket === "undefined") return;
  const jobId = root.dataset.job;
  const $ = (id) => document.getElementById(id);

  const state = {
    metrics: new Map(), // step -> metric event
    evals: new Map(), // step -> eval event
    logs: new Map(), // id -> log event
    status: null,
    done: false,
    logScale: false,
    retries: 0,
    socket: null,
    clockOffset: 0, // the server's clock minus this browser's, from the last status event
    chart: null, // the uPlot chart
  };
  const times = window.splitlearnTimes;
  const renderedStatus = root.dataset.status;
  window.jobLive = state; // for tests and the console

  // ------------------------------------------------------------------ chart

  let plot = null;
  let redrawPending = false;

  const charts = window.splitlearnCharts;
  const smoothed = charts.smoothed;

  function chartData() {
    const steps = Array.from(new Set([...state.metrics.keys(), ...state.evals.keys()])).sort((a, b) => a - b);
    const loss = steps.map((s) => (state.metrics.has(s) ? state.metrics.get(s).loss : null));
    const val = steps.map((s) => (state.evals.has(s) ? state.evals.get(s).val_loss : null));
    const lr = steps.map((s) => (state.metrics.has(s) ? state.metrics.get(s).lr : null));
    return [steps, loss, smoothed(loss, 0.8), val, lr];
  }

  function makePlot() {
    const container = $("loss-chart");
    if (plot) plot.destroy();
    const opts = {
      width: charts.width(container),
      height: 320,
      scales: { x: { time: false }, y: state.logScale ? { distr: 3 } : {}, lr: {} },
      hooks: charts.latestInLegend(),
      axes: [
        charts.stepAxis(),
        { label: "loss", scale: "y" },
        // Room for ticks like "2.0e-4" between the plot and the axis title.
        { label: "learning rate", scale: "lr", side: 1, size: 70, labelGap: 8, grid: { show: false },
          values: (u, ticks) => ticks.map((t) => t.toExponential(1)) },
      ],
      series: [
        charts.stepSeries(),
        { label: "train loss", stroke: "rgba(47,111,221,0.35)", width: 1, scale: "y", spanGaps: true, value: loss },
        { label: "train loss (smoothed)", stroke: "#2f6fdd", width: 2, scale: "y", spanGaps: true, value: loss },
        { label: "validation loss", stroke: "#d9480f", width: 2, scale: "y", spanGaps: true,
          points: { show: true, size: 6 }, value: loss },
        { label: "learning rate", stroke: "#2b8a3e", width: 1, dash: [4, 4], scale: "lr", spanGaps: true,
          value: charts.legendValue((v) => v.toExponential(2)) },
      ],
    };
    plot = new uPlot(opts, chartData(), container);
    state.chart = plot;
  }

  const loss = charts.legendValue((v) => v.toFixed(4));

  function redraw() {
    if (redrawPending) return;
    redrawPending = true;
    requestAnimationFrame(() => {
      redrawPending = false;
      if (!plot) makePlot();
      else plot.setData(chartData());
      $("chart-points").textContent = String(state.metrics.size);
      $("chart-points-unit").textContent = state.metrics.size === 1 ? "step" : "steps";
    });
  }

  // ------------------------------------------------------------------ progress, facts, log

  function formatSeconds(s) {
    if (s == null || !isFinite(s)) return "–";
    s = Math.round(s);
    const h = Math.floor(s / 3600), m = Math.floor((s % 3600) / 60), sec = s % 60;
    return (h ? h + "h " : "") + (h || m ? m + "m " : "") + sec + "s";
  }

  function formatBytes(n) {
    if (n == null) return "–";
    const units = ["B", "KiB", "MiB", "GiB", "TiB"];
    let i = 0;
    while (n >= 1024 && i < units.length - 1) { n /= 1024; i += 1; }
    return n.toFixed(i ? 1 : 0) + " " + units[i];
  }

  function updateProgress() {
    const status = state.status || {};
    const steps = Array.from(state.metrics.keys());
    const step = steps.length ? Math.max(...steps) : status.current_step || 0;
    const total = status.total_steps;
    const last = state.metrics.get(step);
    $("progress-bar").max = total || 1;
    $("progress-bar").value = Math.min(step, total || step);
    $("progress-text").textContent = total ? `${step} / ${total}` : String(step);
    tick();
    $("tokens-per-s").textContent = last && last.tokens_per_s != null ? Math.round(last.tokens_per_s).toLocaleString() : "–";
    let wire = 0;
    state.metrics.forEach((m) => { wire += m.wire_bytes || 0; });
    $("wire-bytes").textContent = last ? `${formatBytes(last.wire_bytes)} per step, ${formatBytes(wire)} in all` : "–";
  }

  // Wall-clock seconds per step over the last (up to) 20 steps, from the times the steps ended.
  function secondsPerStep() {
    const steps = Array.from(state.metrics.keys()).sort((a, b) => a - b).slice(-21);
    const timed = steps.map((s) => state.metrics.get(s)).filter((m) => m.time);
    if (timed.length < 2) return null;
    const first = timed[0], last = timed[timed.length - 1];
    const seconds = (new Date(last.time) - new Date(first.time)) / 1000;
    return last.step > first.step && seconds > 0 ? seconds / (last.step - first.step) : null;
  }

  // Elapsed and time left, every second, from the server's start time (not only when a step ends).
  function tick() {
    const status = state.status || {};
    const now = Date.now() + state.clockOffset;
    const started = status.started_at ? new Date(status.started_at).getTime() : null;
    const finished = status.finished_at ? new Date(status.finished_at).getTime() : null;
    const running = status.status === "running";
    $("elapsed").textContent = started ? formatSeconds(((running ? now : finished || now) - started) / 1000) : "–";
    const steps = Array.from(state.metrics.keys());
    const step = steps.length ? Math.max(...steps) : 0;
    const total = status.total_steps;
    const perStep = secondsPerStep();
    let eta = "–";
    if (running && total && step && step < total && perStep) {
      const sinceLast = Math.max(0, (now - new Date(state.metrics.get(step).time).getTime()) / 1000);
      eta = formatSeconds(Math.max(0, (total - step) * perStep - sinceLast));
    } else if (running && total && step >= total) {
      eta = "finishing";
    }
    $("eta").textContent = eta;
  }

  function statusLine(event) {
    const steps = Array.from(state.metrics.keys());
    const step = steps.length ? Math.max(...steps) : 0;
    if (event.status === "running" && !event.cancel_requested && (event.phase === "training" || !event.phase) && step) {
      return `Training: step ${step}` + (event.total_steps ? ` of ${event.total_steps}` : "") + " done";
    }
    return event.status_line || "";
  }

  function showTime(id, iso) {
    const cell = $(id);
    cell.replaceChildren(iso ? times.element(iso) : "–");
  }

  function updateStatus(event) {
    state.status = event;
    if (event.server_time) state.clockOffset = new Date(event.server_time).getTime() - Date.now();
    if (event.status !== renderedStatus) {
      // A message from the last action ("Queued again…") no longer describes the job.
      document.querySelectorAll(".messages").forEach((list) => { list.hidden = true; });
    }
    if (event.name) $("job-name").textContent = event.name;
    if (event.links && event.links.length > 1) renderChain(event.links);
    else if (event.trunk) $("fact-trunk").textContent = event.trunk;
    if (event.train_examples != null) {
      $("fact-examples").textContent = `${event.train_examples} training, ${event.val_examples} validation`;
    }
    const phase = $("job-phase");
    phase.textContent = statusLine(event);
    phase.hidden = !phase.textContent;
    const badge = $("job-status");
    badge.textContent = event.status_display || event.status;
    badge.className = "status status-" + event.status;
    const error = $("job-error");
    error.textContent = event.error_message || "";
    error.hidden = !event.error_message;
    $("cancel-form").hidden = !event.can_cancel;
    $("resume-form").hidden = !event.can_resume;
    $("delete-link").hidden = !event.can_delete;
    $("cancel-pending").hidden = !(event.cancel_requested && event.status === "running");
    $("fact-progress").textContent = `step ${event.current_step}` + (event.total_steps ? ` of ${event.total_steps}` : "");
    $("fact-loss").textContent = event.last_loss != null ? event.last_loss.toFixed(4) : "–";
    $("fact-val-loss").textContent = event.last_val_loss != null ? event.last_val_loss.toFixed(4) : "–";
    showTime("fact-started", event.started_at);
    showTime("fact-finished", event.finished_at);
    const download = $("download-link");
    if (event.download_url) { download.href = event.download_url; download.hidden = false; } else { download.hidden = true; }
    $("playground-link").hidden = !event.download_url;
    const merged = $("merged-model");
    if (merged) merged.hidden = !event.download_url; // a succeeded job offers its merged model too
    if (event.privacy) renderAudit(event.privacy);
    updateProgress();
  }

  // The chain of trunks, as the server renders it in training/_chain.html.
  function renderChain(links) {
    const summary = document.createElement("span");
    summary.dataset.role = "chain-summary";
    summary.textContent = `a chain of ${links.length} trunk servers`;
    const list = window.chainList(links);
    list.id = "job-chain";
    $("fact-trunk").replaceChildren(summary, list);
  }

  // The leakage audit, as the server renders it in training/_privacy_audit.html.
  function renderAudit(privacy) {
    const box = $("privacy-audit");
    box.replaceChildren();
    privacy.moments.forEach((moment) => {
      const div = document.createElement("div");
      div.className = "audit";
      div.dataset.moment = moment.moment;
      const headline = document.createElement("p");
      headline.className = "audit-headline " + (moment.worst_rate >= 0.05 ? "leaky" : "tight");
      const strong = document.createElement("strong");
      strong.textContent = moment.headline.charAt(0).toUpperCase() + moment.headline.slice(1);
      const context = document.createElement("span");
      context.className = "muted";
      context.textContent = ` (${moment.when}; ${moment.cut}; ${moment.examples} examples` +
        `${moment.strong ? "" : "; strong attacks not run"})`;
      headline.append(strong, context);
      const table = document.createElement("table");
      table.className = "audit-table";
      const head = table.createTHead().insertRow();
      ["Attack", "Tokens read"].forEach((title) => {
        const th = document.createElement("th");
        th.textContent = title;
        head.appendChild(th);
      });
      const body = document.createElement("tbody");
      moment.attacks.forEach((attack) => {
        const row = body.insertRow();
        row.dataset.attack = attack.name;
        row.insertCell().textContent = attack.title;
        const cell = row.insertCell();
        const detail = document.createElement("span");
        detail.className = "muted";
        detail.textContent = ` (${attack.recovered} of ${attack.total})`;
        cell.append(attack.percent, detail);
      });
      table.appendChild(body);
      div.append(headline, table);
      box.appendChild(div);
    });
    if (privacy.chain) {
      const note = document.createElement("p");
      note.className = "muted";
      note.dataset.role = "chain-audit";
      note.textContent = privacy.chain;
      box.appendChild(note);
    }
  }

  function addLog(entry) {
    if (state.logs.has(entry.id)) return;
    state.logs.set(entry.id, entry);
    const list = $("log-tail");
    const line = document.createElement("div");
    line.className = "log-" + entry.level;
    line.dataset.id = entry.id;
    line.append(times.element(entry.time, "time"), `  ${entry.message}`);
    list.appendChild(line);
    while (list.childElementCount > 200) list.removeChild(list.firstChild);
    list.scrollTop = list.scrollHeight;
  }

  // ------------------------------------------------------------------ events

  function handle(event) {
    switch (event.type) {
      case "status":
        updateStatus(event);
        break;
      case "history":
        event.metrics.forEach((p) => (p.type === "eval" ? state.evals : state.metrics).set(p.step, p));
        event.logs.forEach(addLog);
        redraw();
        updateProgress();
        break;
      case "metric":
        state.metrics.set(event.step, event);
        $("fact-progress").textContent = `step ${event.step}` + (event.total_steps ? ` of ${event.total_steps}` : "");
        $("fact-loss").textContent = event.loss.toFixed(4);
        if (state.status && event.total_steps) state.status.total_steps = event.total_steps;
        if (state.status) {
          const phase = $("job-phase");
          phase.textContent = statusLine(state.status);
          phase.hidden = !phase.textContent;
        }
        redraw();
        updateProgress();
        break;
      case "eval":
        state.evals.set(event.step, event);
        $("fact-val-loss").textContent = event.val_loss.toFixed(4);
        redraw();
        break;
      case "log":
        addLog(event);
        break;
      case "done":
        state.done = true;
        break;
    }
  }

  function lastStep() {
    const steps = Array.from(state.metrics.keys());
    // One step back: an evaluation of the last step may not have arrived before a drop.
    return steps.length ? Math.max(0, Math.max(...steps) - 1) : null;
  }

  function connect() {
    const params = new URLSearchParams();
    const after = lastStep();
    if (after !== null) params.set("after", String(after));
    if (state.logs.size) params.set("log_after", String(Math.max(...state.logs.keys())));
    const scheme = location.protocol === "https:" ? "wss" : "ws";
    const socket = new WebSocket(`${scheme}://${location.host}/ws/jobs/${jobId}/?${params}`);
    state.socket = socket;
    $("connection").textContent = "connecting…";
    socket.onopen = () => { state.retries = 0; $("connection").textContent = "live"; };
    socket.onmessage = (message) => handle(JSON.parse(message.data));
    socket.onclose = (close) => {
      if (close.code === 4401 || close.code === 4404) {
        $("connection").textContent = "not allowed: reload the page";
        return;
      }
      const finished = state.status && ["succeeded", "failed", "cancelled"].includes(state.status.status);
      const delay = Math.min(30000, 500 * Math.pow(2, state.retries)) * (0.75 + Math.random() / 2);
      state.retries += 1;
      $("connection").textContent = finished ? "finished" : `reconnecting in ${Math.round(delay / 1000)} s…`;
      // A finished job may still be resumed: keep listening, but less eagerly.
      setTimeout(connect, finished ? Math.max(delay, 5000) : delay);
    };
  }

  // The chart replaces the static table of the page without JavaScript.
  $("static-metrics").hidden = true;
  // Lines the server rendered into the page are already shown.
  $("log-tail").querySelectorAll("[data-id]").forEach((line) => state.logs.set(Number(line.dataset.id), null));
  $("log-scale").addEventListener("change", (e) => { state.logScale = e.target.checked; makePlot(); });
  window.addEventListener("resize", () => { if (plot) plot.setSize({ width: charts.width($("loss-chart")), height: 320 }); });
  makePlot();
  connect();
  window.setInterval(tick, 1000);
})();
