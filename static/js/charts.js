// Shared chart helpers for the job, compare and fleet pages.
window.splitlearnCharts = {
  // Exponential moving average with bias correction (as TensorBoard's smoothing); nulls stay gaps.
  smoothed: function (values, weight) {
    const out = [];
    let last = 0;
    let count = 0;
    for (const v of values) {
      if (v == null) { out.push(null); continue; }
      last = last * weight + (1 - weight) * v;
      count += 1;
      out.push(last / (1 - Math.pow(weight, count)));
    }
    return out;
  },

  // The x axis of steps: whole steps only (a 3-step job is labelled 1, 2, 3, never 1.2, 1.4, …).
  stepAxis: function () {
    const increments = [];
    for (let magnitude = 1; magnitude <= 1e9; magnitude *= 10) {
      increments.push(magnitude, 2 * magnitude, 5 * magnitude);
    }
    return { label: "step", incrs: increments, values: (u, ticks) => ticks.map((tick) => String(tick)) };
  },

  // The series of steps (uPlot's first), as the legend shows it.
  stepSeries: function () {
    return { label: "step", value: window.splitlearnCharts.legendValue(String) };
  },

  // The legend shows the values at the cursor while hovering, and the latest step's values otherwise
  // (uPlot's own legend shows "--" until the chart is hovered). Add to the chart's options.
  latestInLegend: function () {
    return {
      setLegend: [(u) => {
        const steps = u.data[0];
        if (u.legend.idx == null && steps && steps.length) {
          u.setLegend({ idx: steps.length - 1 }, false); // false: no new setLegend event, so no loop
        }
      }],
    };
  },

  // A legend value: the number as `format` writes it, nothing where a series has no point at that step.
  legendValue: function (format) {
    return (u, value) => (value == null ? "" : format(value));
  },

  // The width a chart can take in its container: all of it, and never less than a phone's screen leaves.
  width: function (container) {
    return Math.max(240, container.clientWidth || 800);
  },
};
