// The status page's refresh: every few seconds, fetch api/v1/status and redraw in place.
// Charts arrive as layouts (lists of drawing primitives, computed by the server) and are drawn
// here exactly as the server's renderer (sinks/status/svg.py) draws them on first load. When
// the page's structure changes (an engine, medium or alert comes or goes) it reloads instead.
"use strict";
(function () {
  const NS = "http://www.w3.org/2000/svg";
  const main = document.getElementById("status");

  function el(name, attrs, text) {
    const node = document.createElementNS(NS, name);
    for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, v);
    if (text !== undefined) node.textContent = text;
    return node;
  }

  function draw(chart) {
    const id = chart.id;
    const svg = el("svg", {
      class: "chart", id: id, viewBox: `0 0 ${chart.width} ${chart.height}`, role: "img",
      "aria-labelledby": `${id}-t ${id}-d`, "data-points": chart.points,
    });
    svg.appendChild(el("title", { id: `${id}-t` }, chart.title));
    svg.appendChild(el("desc", { id: `${id}-d` }, chart.desc));
    for (const item of chart.items) {
      if (item.t === "path") {
        svg.appendChild(el("path", { class: item.c, d: item.d }));
      } else if (item.t === "rect") {
        const rect = el("rect", { class: item.c, x: item.x, y: item.y, width: item.w, height: item.h });
        rect.appendChild(el("title", {}, item.s));
        svg.appendChild(rect);
      } else {
        const attrs = { class: item.c, x: item.x, y: item.y, "text-anchor": item.a };
        if (item.r !== undefined) attrs.transform = `rotate(${item.r} ${item.x} ${item.y})`;
        svg.appendChild(el("text", attrs, item.s));
      }
    }
    return svg;
  }

  function setFigure(key, fig) {
    const node = document.querySelector(`[data-key="${CSS.escape(key)}"]`);
    if (!node) return false;
    node.dataset.value = fig.value === null ? "" : String(fig.value);
    node.querySelector(".v").textContent = fig.text;
    return true;
  }

  async function refresh() {
    const response = await fetch("api/v1/status", { cache: "no-store", credentials: "same-origin" });
    if (!response.ok) throw new Error(`api/v1/status: HTTP ${response.status}`);
    const doc = await response.json();
    if (doc.layout !== main.dataset.layout) {
      location.reload();
      return doc;
    }
    let whole = true;
    for (const engine of doc.engines) {
      for (const [name, fig] of Object.entries(engine.health)) {
        whole = setFigure(`${engine.engine}||${name}`, fig) && whole;
      }
      for (const alert of engine.alerts) {
        const node = document.querySelector(
          `[data-key="${CSS.escape(`${engine.engine}|!${alert.alert}`)}"] .v`);
        if (node) node.textContent = alert.message;
      }
      for (const medium of engine.media) {
        for (const [name, fig] of Object.entries(medium.figures)) {
          whole = setFigure(`${engine.engine}|${medium.medium}|${name}`, fig) && whole;
        }
        for (const chart of medium.charts) {
          const old = document.getElementById(chart.id);
          if (old) old.replaceWith(draw(chart));
          else whole = false;
        }
      }
    }
    if (!whole) {
      location.reload();
      return doc;
    }
    const stamp = document.getElementById("generated");
    stamp.textContent = new Date(doc.generated_at * 1000).toLocaleTimeString();
    stamp.dataset.value = String(doc.generated_at);
    return doc;
  }

  const every = Number(main.dataset.refresh) * 1000;
  setInterval(() => refresh().catch((err) => console.warn(err)), every);
  // For the browser test: a refresh on demand (resolved once the page shows it), and the
  // renderer, to compare with the server's.
  window.kvcacheStatus = { refresh: refresh, draw: draw };
})();
