// One way to draw a chain of trunks live (fleet.js, job_live.js): an <ol class="chain"> with one
// line per link, "link N: trunk blocks state", as trunks/_chain_link.html renders it on the server.
(function () {
  "use strict";

  function chainList(links) {
    const list = document.createElement("ol");
    list.className = "chain";
    for (const link of links) {
      const item = document.createElement("li");
      item.dataset.link = String(link.number);
      const name = document.createElement("strong");
      name.textContent = link.trunk;
      const blocks = document.createElement("span");
      blocks.className = "muted";
      blocks.textContent = link.blocks;
      const state = document.createElement("span");
      state.className = `status status-${link.state}`;
      state.textContent = link.state;
      item.append(`link ${link.number}: `, name, " ", blocks, " ", state);
      list.appendChild(item);
    }
    return list;
  }

  window.chainList = chainList;
})();
