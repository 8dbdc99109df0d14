// The runs table: status, model, method, key settings, losses and eval scores of every run, refreshed.
"use strict";

const selected = new Set();

function settingsText(settings) {
  return Object.entries(settings).map(([k, v]) => `${k.split(".").pop()}=${fmt(v)}`).join(" ");
}

// A `tuneforge tune` trial: which study it belongs to, and the study's best trial highlighted.
function studyBadge(study) {
  if (!study) return null;
  return el("span", { class: "badge study" + (study.best ? " best" : ""), title: `tune study ${study.study}` },
    study.best ? `best of ${study.study} (${study.metric})` : `trial of ${study.study}`);
}

function row(run) {
  const box = el("input", { type: "checkbox", checked: selected.has(run.name), onchange: e => {
    e.target.checked ? selected.add(run.name) : selected.delete(run.name);
    document.getElementById("compare").disabled = selected.size < 2;
  } });
  const progress = run.status.total_steps ? `${run.status.step}/${run.status.total_steps}` : fmt(run.status.step);
  const scores = Object.entries(run.eval).map(([k, v]) => `${k} ${fmt(v, 3)}`).join(", ");
  return el("tr", { "data-run": run.name },
    el("td", {}, box), el("td", {}, runLink(run.name), studyBadge(run.study)), el("td", {}, statusBadge(run.status)),
    el("td", {}, run.model), el("td", {}, run.method), el("td", {}, settingsText(run.settings)),
    el("td", { class: "num" }, progress), el("td", { class: "num" }, fmt(run.last_loss)),
    el("td", { class: "num" }, fmt(run.best_val_loss)), el("td", {}, scores || "–"));
}

async function refresh() {
  try {
    const runs = await api("/api/runs");
    const body = document.querySelector("#runs tbody");
    body.replaceChildren(...(runs.length ? runs.map(row)
      : [el("tr", {}, el("td", { colspan: 10, class: "muted" }, "No runs yet: `tuneforge train RUN.yaml` writes one."))]));
    showError(null);
  } catch (error) { showError(error); }
}

document.addEventListener("DOMContentLoaded", () => {
  document.getElementById("compare").addEventListener("click", () => {
    location.href = "/compare?" + [...selected].map(n => "run=" + encodeURIComponent(n)).join("&");
  });
  refresh();
  setInterval(refresh, 3000);
});
