// Several runs' curves on shared axes, and the config keys where they differ.
"use strict";

const names = new URLSearchParams(location.search).getAll("run");

async function draw() {
  const data = await api("/api/compare?" + names.map(n => "run=" + encodeURIComponent(n)).join("&"));
  const overlay = key => names.map(name => ({ name, points: data.curves[name][key] }));
  lineChart(document.getElementById("chart-loss"), "train loss", overlay("loss"));
  lineChart(document.getElementById("chart-val"), "val loss", overlay("val_loss"));
  lineChart(document.getElementById("chart-lr"), "learning rate", overlay("lr"));
  lineChart(document.getElementById("chart-speed"), "tokens/s", overlay("tokens_per_s"));
  const rows = Object.entries(data.differences).map(([key, values]) =>
    el("tr", {}, el("th", {}, key), names.map(n => el("td", {}, values[n] === null ? "–" : JSON.stringify(values[n])))));
  document.getElementById("differences").replaceChildren(
    el("tr", {}, el("th", {}, "key"), names.map(n => el("th", {}, runLink(n)))),
    ...(rows.length ? rows : [el("tr", {}, el("td", { colspan: names.length + 1 }, "The configs are identical."))]));
}

document.addEventListener("DOMContentLoaded", () => {
  if (names.length < 1) { showError("no runs selected: tick two or more on the runs page"); return; }
  draw().catch(showError);
  setInterval(() => draw().catch(showError), 3000);
});
