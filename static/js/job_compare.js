// Overlaid loss curves of several jobs (data embedded in the page by the server), and the settings
// table's "only the settings that differ" switch.
(function () {
  "use strict";
  const onlyDiffering = document.getElementById("only-differing");
  if (onlyDiffering) {
    onlyDiffering.addEventListener("change", () => {
      document.querySelectorAll("table.compare tr.setting").forEach((row) => {
        row.hidden = onlyDiffering.checked && !row.classList.contains("differs");
      });
    });
  }

  const source = document.getElementById("compare-series");
  const container = document.getElementById("compare-chart");
  if (!source || !container) return;
  const runs = JSON.parse(source.textContent);
  const colors = ["#2f6fdd", "#d9480f", "#2b8a3e", "#7048e8", "#c2255c", "#0b7285", "#e67700", "#495057"];
  let plot = null;

  const charts = window.splitlearnCharts;
  const smoothed = charts.smoothed;

  function data() {
    const steps = new Set();
    runs.forEach((r) => { r.train.forEach(([s]) => steps.add(s)); r.val.forEach(([s]) => steps.add(s)); });
    const xs = Array.from(steps).sort((a, b) => a - b);
    const columns = [xs];
    runs.forEach((r) => {
      const train = new Map(r.train), val = new Map(r.val);
      const raw = xs.map((s) => (train.has(s) ? train.get(s) : null));
      columns.push(smoothed(raw, 0.8));
      columns.push(xs.map((s) => (val.has(s) ? val.get(s) : null)));
    });
    return columns;
  }

  // A legend entry: the job's name, its id small and muted, then which curve (built as text, never markup).
  function legendLabel(run, curve) {
    const label = document.createElement("span");
    const id = document.createElement("small");
    id.className = "muted";
    id.textContent = "#" + run.id;
    label.append(run.name + " ", id, " " + curve);
    return label;
  }

  function draw(logScale) {
    if (plot) plot.destroy();
    const series = [charts.stepSeries()];
    const loss = charts.legendValue((v) => v.toFixed(4));
    runs.forEach((r, i) => {
      const color = colors[i % colors.length];
      series.push({ label: legendLabel(r, "train"), stroke: color, width: 2, spanGaps: true, value: loss });
      series.push({ label: legendLabel(r, "val"), stroke: color, width: 2, dash: [6, 4], spanGaps: true,
                    points: { show: true, size: 5 }, value: loss });
    });
    plot = new uPlot({ width: charts.width(container), height: 340,
                       scales: { x: { time: false }, y: logScale ? { distr: 3 } : {} },
                       hooks: charts.latestInLegend(),
                       axes: [charts.stepAxis(), { label: "loss" }], series: series }, data(), container);
    window.compareChart = plot; // for tests and the console
  }

  window.addEventListener("resize", () => { if (plot) plot.setSize({ width: charts.width(container), height: 340 }); });

  document.getElementById("log-scale").addEventListener("change", (e) => draw(e.target.checked));
  draw(false);
})();
