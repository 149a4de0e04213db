// The fleet page, live: /ws/fleet/ sends every trunk's row on connect and again after each change
// (a round of health checks, an action, a job starting or ending on a trunk). The rows are the
// server's (webapp/trunks/fleet.py); this fills the cards the server rendered, adds a card for a
// trunk registered meanwhile (from the empty one in <template>) and removes deleted ones.
(function () {
  "use strict";
  const container = document.getElementById("fleet");
  const template = document.getElementById("fleet-row-template");
  const live = document.getElementById("fleet-live");
  const actionUrl = container.dataset.actionUrl; // the URL of trunk 0's "check": the pattern of every action
  const times = window.splitlearnTimes;
  const charts = new Map(); // "<trunk id>:<series>" -> uPlot
  const CHART_UNITS = { latency_ms: "ms", tokens_per_s: "tokens/s" };
  const WINDOW_S = Number(container.dataset.windowSeconds);
  let retries = 0;

  function field(card, name) {
    return card.querySelector(`[data-field="${name}"]`);
  }

  function setText(card, name, value) {
    const node = field(card, name);
    if (node) node.textContent = value;
    return node;
  }

  function orDash(value, suffix) {
    return value == null || value === "" ? "–" : `${value}${suffix || ""}`;
  }

  function addCard(row) {
    const card = template.content.firstElementChild.cloneNode(true);
    card.dataset.trunk = String(row.id);
    card.querySelectorAll("form[data-action]").forEach((form) => {
      form.action = actionUrl.replace(/\/0\/check\/$/, `/${row.id}/${form.dataset.action}/`);
    });
    container.appendChild(card);
    return card;
  }

  function fillJobs(list, jobs) {
    list.replaceChildren();
    if (!jobs.length) {
      const none = document.createElement("li");
      none.className = "muted";
      none.textContent = "none";
      list.appendChild(none);
      return;
    }
    for (const job of jobs) {
      const item = document.createElement("li");
      const link = document.createElement("a");
      link.href = job.url;
      link.textContent = `job ${job.id}: ${job.name}`;
      const note = document.createElement("span");
      note.className = "muted";
      note.textContent = ` (${job.owner}) ${job.status_line}`;
      item.append(link);
      if (job.link) {
        const role = document.createElement("span");
        role.className = "chain-link";
        role.dataset.role = "link";
        role.textContent = `as ${job.link}`;
        item.append(" ", role);
      }
      item.append(note);
      list.appendChild(item);
    }
  }

  // The running jobs on chains of trunks, as templates/trunks/_fleet_chain.html renders them.
  function fillChains(chains) {
    const section = document.getElementById("fleet-chains");
    if (!section) return;
    const list = section.querySelector('[data-field="chains"]');
    list.replaceChildren();
    for (const chain of chains || []) {
      const item = document.createElement("li");
      item.dataset.job = String(chain.id);
      const link = document.createElement("a");
      link.href = chain.url;
      link.textContent = `job ${chain.id}: ${chain.name}`;
      const note = document.createElement("span");
      note.className = "muted";
      note.textContent = ` (${chain.owner}) ${chain.status_line}`;
      item.append(link, note, window.chainList(chain.links));
      list.appendChild(item);
    }
    section.hidden = !(chains && chains.length);
  }

  // The charts span the window the server sends (the last hour up to its clock), whatever was sampled.
  // The y axis has its values; hovering a chart reads the sample under the pointer in the line under it.
  let windowEnd = Date.now() / 1000;
  const pad2 = (n) => String(n).padStart(2, "0");
  const clock = (seconds) => {
    const date = new Date(seconds * 1000);
    return `${pad2(date.getHours())}:${pad2(date.getMinutes())}`;
  };
  const CHART_LABELS = { latency_ms: "Latency", tokens_per_s: "Throughput" };
  const CHART_COLORS = { latency_ms: ["#8250df", "rgba(130,80,223,.08)"], tokens_per_s: ["#1f6feb", "rgba(31,111,235,.08)"] };

  // 0.25, 12.5, 340, 1.2k, 45k: short enough for the axis.
  function shortNumber(value) {
    if (value == null || !isFinite(value)) return "";
    const size = Math.abs(value);
    if (size >= 1e6) return `${+(value / 1e6).toFixed(1)}M`;
    if (size >= 1e3) return `${+(value / 1e3).toFixed(1)}k`;
    if (size >= 10 || size === 0) return String(Math.round(value));
    return String(+value.toFixed(2));
  }

  // Ticks at 1, 2 or 5 times a power of ten, three or four of them from 0 up to the scale's top.
  function ySplits(u, axisIndex, min, max) {
    const raw = Math.max(max, 1e-9) / 3;
    const power = Math.pow(10, Math.floor(Math.log10(raw)));
    const step = [1, 2, 5, 10].map((m) => m * power).find((candidate) => candidate >= raw);
    const splits = [];
    for (let value = 0; value <= max + step * 1e-9; value += step) splits.push(+value.toPrecision(12));
    return splits;
  }

  function reading(key, value) {
    if (value == null) return key === "latency_ms" ? "down or not checked" : "not counted";
    return key === "latency_ms" ? `${value.toFixed(1)} ms` : `${Math.round(value)} tokens/s`;
  }

  function chart(card, row, key) {
    const box = card.querySelector(`[data-chart="${key}"]`);
    if (!box || typeof uPlot === "undefined") return;
    const data = [row.series.time, row.series[key]];
    const id = `${row.id}:${key}`;
    let plot = charts.get(id);
    if (plot && plot.root.isConnected) {
      plot.setData(data);
      return;
    }
    box.replaceChildren();
    const axisFont = "10px system-ui";
    plot = new uPlot({
      width: Math.max(160, box.clientWidth || 240), height: 100,
      legend: { show: true, live: true },
      hooks: window.splitlearnCharts.latestInLegend(), // the latest check's reading until the pointer is over it
      cursor: { show: true, x: true, y: false, points: { size: 6 }, drag: { x: false, y: false } },
      scales: {
        x: { time: true, range: () => [windowEnd - WINDOW_S, windowEnd] },
        y: { range: (u, min, max) => [0, max == null || !isFinite(max) || max <= 0 ? 1 : max * 1.15] },
      },
      axes: [
        { size: 22, font: axisFont, ticks: { show: false }, space: 50, values: (u, splits) => splits.map(clock) },
        { size: 40, font: axisFont, ticks: { show: false }, gap: 3, splits: ySplits,
          values: (u, splits) => {
            // The scale in words for the tests and screen readers (the axis itself is drawn on the canvas).
            box.dataset.yTicks = splits.map(shortNumber).join(" ");
            box.setAttribute("aria-label", `${CHART_LABELS[key]} (${CHART_UNITS[key]}), 0 to ${shortNumber(splits[splits.length - 1])}`);
            return splits.map(shortNumber);
          } },
      ],
      series: [
        { label: "checked", value: (u, value) => (value == null ? "–" : times.format(new Date(value * 1000), "time")) },
        { label: `${CHART_LABELS[key]}`, stroke: CHART_COLORS[key][0], width: 1.5, fill: CHART_COLORS[key][1],
          spanGaps: false, value: (u, value) => (value == null && u.cursor.idx == null ? "–" : reading(key, value)) },
      ],
    }, data, box);
    charts.set(id, plot);
  }

  function fill(card, row) {
    const badge = setText(card, "status", row.status);
    badge.className = `status status-${row.status}`;
    const name = setText(card, "name", row.name);
    name.href = row.change_url;
    setText(card, "address", row.address);
    const drain = setText(card, "drain_state", row.drain_state);
    drain.hidden = !row.draining;
    drain.classList.toggle("empty", row.empty);
    setText(card, "model_id", orDash(row.model_id));
    setText(card, "layers", orDash(row.layers));
    setText(card, "device", row.device || "not reported");
    setText(card, "memory", row.memory || "not reported");
    setText(card, "sessions", row.max_sessions == null ? "–" : `${row.active_sessions || 0} of ${row.max_sessions}`);
    setText(card, "latency", row.latency_ms == null ? "–" : `${row.latency_ms.toFixed(1)} ms`);
    setText(card, "throughput", row.tokens_per_s == null ? "–" : `${Math.round(row.tokens_per_s)} tokens/s`);
    setText(card, "busy", row.busy_fraction == null ? "–"
      : `${Math.round(row.busy_fraction * 100)}% of the last hour`);
    const checked = field(card, "last_checked_at");
    checked.replaceChildren(row.last_checked_at ? times.element(row.last_checked_at) : "never");
    fillJobs(field(card, "jobs"), row.jobs);
    const error = setText(card, "last_error", row.last_error);
    error.hidden = !row.last_error;
    card.querySelectorAll("form[data-action]").forEach((form) => {
      form.hidden = !row.actions.includes(form.dataset.action);
    });
    chart(card, row, "latency_ms");
    chart(card, row, "tokens_per_s");
  }

  // The action buttons post with fetch and update their row from the JSON answer (fleet_action in
  // webapp/trunks/views.py); the answer, or why the action was refused, shows on the row. The WebSocket
  // brings the same row to every other open page.
  function showAnswer(card, answer) {
    const note = field(card, "action_message");
    if (!note) return;
    note.textContent = answer.message;
    note.classList.toggle("refused", !answer.ok);
    note.hidden = false;
  }

  async function send(form) {
    const card = form.closest("article[data-trunk]");
    const button = form.querySelector("button");
    button.disabled = true;
    button.setAttribute("aria-busy", "true");
    let answer;
    try {
      const response = await fetch(form.action, {
        method: "POST", body: new FormData(form), credentials: "same-origin",
        headers: { Accept: "application/json", "X-CSRFToken": form.elements.csrfmiddlewaretoken.value },
      });
      const type = response.headers.get("Content-Type") || "";
      answer = type.startsWith("application/json") ? await response.json()
        : { ok: false, message: `The server answered ${response.status} ${response.statusText || ""} to `
            + `"${button.textContent.trim()}": reload the page (you may have been logged out) and try again.` };
    } catch (error) {
      answer = { ok: false, message: `"${button.textContent.trim()}" did not reach the server (${error.message}): `
        + "check the connection and try again." };
    } finally {
      button.disabled = false;
      button.removeAttribute("aria-busy");
    }
    if (answer.row) fill(card, answer.row);
    showAnswer(card, answer);
  }

  container.addEventListener("submit", (event) => {
    const form = event.target.closest("form[data-action]");
    if (!form || typeof fetch === "undefined") return; // the plain post: the page reloads with the answer
    event.preventDefault();
    send(form);
  });

  function render(snapshot) {
    windowEnd = new Date(snapshot.server_time).getTime() / 1000;
    const seen = new Set();
    for (const row of snapshot.rows) {
      const card = container.querySelector(`article[data-trunk="${row.id}"]`) || addCard(row);
      fill(card, row);
      seen.add(String(row.id));
    }
    container.querySelectorAll("article[data-trunk]").forEach((card) => {
      if (seen.has(card.dataset.trunk)) return;
      for (const key of Object.keys(CHART_UNITS)) charts.delete(`${card.dataset.trunk}:${key}`);
      card.remove();
    });
    fillChains(snapshot.chains);
    const empty = document.getElementById("fleet-empty");
    if (empty) empty.hidden = snapshot.rows.length > 0;
    live.dataset.updates = String(Number(live.dataset.updates || 0) + 1);
    live.textContent = `live · updated ${times.format(new Date(snapshot.server_time), "time")}`;
  }

  function connect() {
    const scheme = location.protocol === "https:" ? "wss" : "ws";
    const socket = new WebSocket(`${scheme}://${location.host}/ws/fleet/`);
    socket.onopen = () => { retries = 0; live.dataset.state = "open"; };
    socket.onmessage = (message) => {
      const event = JSON.parse(message.data);
      if (event.type === "fleet") render(event);
    };
    socket.onclose = (close) => {
      live.dataset.state = "closed";
      if (close.code === 4401 || close.code === 4404) {
        live.textContent = "not live: log in again as staff";
        return;
      }
      live.textContent = "reconnecting…";
      retries += 1;
      setTimeout(connect, Math.min(30000, 500 * Math.pow(2, retries)));
    };
  }

  render(JSON.parse(document.getElementById("fleet-data").textContent));
  live.dataset.updates = "0";
  if (typeof WebSocket !== "undefined") connect();
})();
