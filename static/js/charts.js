// Shared chart helpers for the job and compare pages.
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
};
