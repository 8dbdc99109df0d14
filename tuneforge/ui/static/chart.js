// Line charts as plain SVG: no library, no network. Each chart's <svg> carries data-points (how many points are
// drawn, all series together) and each series' <path> its own, which the browser tests read to see a curve grow.
"use strict";

const PALETTE = ["#1f6feb", "#d1242f", "#1a7f37", "#9a6700", "#8250df", "#bf3989", "#0a7480", "#6e7781"];

// series: [{name, points: [[x, y], ...], color?, dots?}]
function lineChart(container, title, series, yLabel = "") {
  const width = 460, height = 240, left = 64, right = 12, top = 26, bottom = 34;
  const all = series.flatMap(s => s.points);
  const svgNS = "http://www.w3.org/2000/svg";
  const svg = document.createElementNS(svgNS, "svg");
  svg.setAttribute("viewBox", `0 0 ${width} ${height}`);
  svg.setAttribute("class", "chart");
  svg.dataset.points = String(all.length);
  svg.dataset.title = title;
  const add = (tag, attrs, text) => {
    const node = document.createElementNS(svgNS, tag);
    for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, v);
    if (text !== undefined) node.textContent = text;
    svg.append(node);
    return node;
  };
  add("text", { x: left, y: 16, class: "chart-title" }, title);
  if (!all.length) {
    add("text", { x: width / 2, y: height / 2, "text-anchor": "middle", class: "chart-empty" }, "no points yet");
    container.replaceChildren(svg);
    return svg;
  }
  const xs = all.map(p => p[0]), ys = all.map(p => p[1]);
  let [x0, x1, y0, y1] = [Math.min(...xs), Math.max(...xs), Math.min(...ys), Math.max(...ys)];
  if (x0 === x1) x1 = x0 + 1;
  if (y0 === y1) { y0 -= Math.abs(y0) * 0.1 || 1; y1 += Math.abs(y1) * 0.1 || 1; }
  const pad = (y1 - y0) * 0.05;
  y0 = y0 >= 0 ? Math.max(0, y0 - pad) : y0 - pad;  // a learning rate or a norm never gets a negative axis
  y1 += pad;
  const sx = x => left + (x - x0) / (x1 - x0) * (width - left - right);
  const sy = y => top + (1 - (y - y0) / (y1 - y0)) * (height - top - bottom);
  // Enough significant digits that neighbouring ticks differ (a learning rate moves in its 4th digit).
  const magnitude = Math.max(Math.abs(y0), Math.abs(y1));
  const tickDigits = Math.min(6, Math.max(3, Math.ceil(Math.log10(magnitude / ((y1 - y0) / 4))) + 1));
  for (let i = 0; i <= 4; i++) {  // horizontal grid with y values
    const y = y0 + (y1 - y0) * i / 4;
    add("line", { x1: left, x2: width - right, y1: sy(y), y2: sy(y), class: "grid" });
    add("text", { x: left - 4, y: sy(y) + 4, "text-anchor": "end", class: "tick" }, fmt(y, tickDigits));
  }
  add("text", { x: left, y: height - 8, class: "tick" }, fmt(x0));
  add("text", { x: width - right, y: height - 8, "text-anchor": "end", class: "tick" }, fmt(x1));
  add("text", { x: (left + width) / 2, y: height - 8, "text-anchor": "middle", class: "tick" }, "step");
  if (yLabel) add("text", { x: 12, y: top - 8, class: "tick" }, yLabel);
  series.forEach((s, i) => {
    const color = s.color || PALETTE[i % PALETTE.length];
    if (!s.points.length) return;
    const d = s.points.map((p, j) => `${j ? "L" : "M"}${sx(p[0]).toFixed(1)},${sy(p[1]).toFixed(1)}`).join("");
    add("path", { d, fill: "none", stroke: color, "stroke-width": 1.6, class: "series", "data-name": s.name,
                 "data-points": s.points.length });
    if (s.dots || s.points.length < 30) {
      for (const p of s.points) add("circle", { cx: sx(p[0]), cy: sy(p[1]), r: 2.4, fill: color });
    }
  });
  if (series.length > 1) {  // legend
    series.forEach((s, i) => {
      const x = width - right - 150, y = top + 4 + i * 14;
      add("rect", { x, y: y - 8, width: 10, height: 3, fill: s.color || PALETTE[i % PALETTE.length] });
      add("text", { x: x + 14, y, class: "legend" }, s.name.length > 22 ? s.name.slice(0, 21) + "…" : s.name);
    });
  }
  container.replaceChildren(svg);
  return svg;
}
