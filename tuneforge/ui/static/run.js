// One run: its curves, polled every 1.5 s so a running job's charts grow as metrics.jsonl does; its config.
"use strict";

const run = param("run");

function yamlish(value, indent = "") {
  // The config as the YAML it came from reads: nested keys indented, lists inline.
  return Object.entries(value).map(([k, v]) => v && typeof v === "object" && !Array.isArray(v)
    ? `${indent}${k}:\n${yamlish(v, indent + "  ")}` : `${indent}${k}: ${JSON.stringify(v)}`).join("\n");
}

async function drawCurves() {
  const { curves, status } = await api("/api/curves?run=" + encodeURIComponent(run));
  lineChart(document.getElementById("chart-loss"), "loss",
    [{ name: "train loss", points: curves.loss }, { name: "val loss", points: curves.val_loss, dots: true }]);
  lineChart(document.getElementById("chart-lr"), "learning rate", [{ name: "lr", points: curves.lr }]);
  lineChart(document.getElementById("chart-grad"), "grad norm", [{ name: "grad norm", points: curves.grad_norm }]);
  lineChart(document.getElementById("chart-speed"), "tokens/s", [{ name: "tokens/s", points: curves.tokens_per_s }]);
  // A preference run (objective dpo, ipo, simpo, orpo, kto) also logs rewards; a supervised one shows no such charts.
  const rewards = document.getElementById("chart-rewards"), accuracy = document.getElementById("chart-reward-accuracy");
  if (curves.reward_accuracy.length) {
    lineChart(rewards, "rewards", [{ name: "chosen", points: curves.rewards_chosen },
      { name: "rejected", points: curves.rewards_rejected }, { name: "margin", points: curves.reward_margin },
      { name: "val margin", points: curves.val_reward_margin, dots: true }]);
    lineChart(accuracy, "reward accuracy", [{ name: "train", points: curves.reward_accuracy },
      { name: "val", points: curves.val_reward_accuracy, dots: true }]);
  } else {
    rewards.replaceChildren();
    accuracy.replaceChildren();
  }
  const facts = document.getElementById("facts");
  const progress = status.total_steps ? ` step ${status.step} of ${status.total_steps}` : ` step ${status.step}`;
  facts.replaceChildren(statusBadge(status), progress, status.detail ? ` — ${status.detail}` : "");
}

async function showRun() {
  const info = await api("/api/run?run=" + encodeURIComponent(run));
  const s = info.summary;
  document.getElementById("title").textContent = `${s.name} · ${s.method} on ${s.model}`;
  document.getElementById("config").textContent = yamlish(info.config);
  const reviews = document.getElementById("reviews");
  const list = info.reviews.map(r => el("li", {},
    el("a", { href: `/review?run=${encodeURIComponent(run)}&review=${encodeURIComponent(r.id)}` }, r.id),
    ` ${r.systems.A.label} vs ${r.systems.B.label}: ${r.rated}/${r.prompts} rated (${r.state})`));
  reviews.replaceChildren(el("ul", {}, list),
    el("a", { href: "/review?run=" + encodeURIComponent(run) }, "Start a review"), " · ",
    el("a", { href: "/playground?run=" + encodeURIComponent(run) }, "Chat with it in the playground"));
}

document.addEventListener("DOMContentLoaded", async () => {
  try { await showRun(); await drawCurves(); } catch (error) { showError(error); }
  setInterval(() => drawCurves().then(() => showError(null), showError), 1500);
});
