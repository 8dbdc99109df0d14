// Side-by-side chat: two models, one message box, the generation settings shared.
"use strict";

const history = { left: [], right: [] };

function render(side) {
  const log = document.getElementById("log-" + side);
  const label = document.getElementById(side).selectedOptions[0];
  log.replaceChildren(el("strong", {}, label ? label.textContent : side),
    ...history[side].map(m => el("div", { class: "turn " + m.role }, el("span", { class: "who" }, m.role + ": "),
      el("span", { class: "text" }, m.content))));
}

async function send(event) {
  event.preventDefault();
  const text = document.getElementById("message").value.trim();
  if (!text) return;
  const system = document.getElementById("system").value.trim();
  const sides = {};
  for (const side of ["left", "right"]) {
    if (!history[side].length && system) history[side].push({ role: "system", content: system });
    history[side].push({ role: "user", content: text });
    sides[side] = { model: document.getElementById(side).value, messages: history[side] };
    render(side);
  }
  document.getElementById("busy").textContent = "generating…";
  document.getElementById("send").disabled = true;
  try {
    const reply = await api("/api/chat", { method: "POST", body: { ...sides,
      max_new_tokens: Number(document.getElementById("max-new-tokens").value),
      temperature: Number(document.getElementById("temperature").value),
      top_p: Number(document.getElementById("top-p").value) } });
    ["left", "right"].forEach((side, i) => history[side].push({ role: "assistant", content: reply.answers[i] }));
    document.getElementById("message").value = "";
    showError(null);
  } catch (error) {
    for (const side of ["left", "right"]) history[side].pop();  // the unanswered message, so a retry resends it
    showError(error);
  } finally {
    document.getElementById("busy").textContent = "";
    document.getElementById("send").disabled = false;
    render("left"); render("right");
  }
}

function reset() {
  history.left = []; history.right = [];
  render("left"); render("right");
}

document.addEventListener("DOMContentLoaded", async () => {
  try {
    const runs = await api("/api/runs");
    const bases = [...new Map(runs.map(r => [r.model, r.name])).entries()];  // one entry per distinct base model
    const options = [...bases.map(([model, name]) => ["base:" + name, "base " + model]),
                     ...runs.filter(r => r.has_weights).map(r => ["run:" + r.name, "run " + r.name])];
    const wanted = param("run");
    if (wanted && !options.some(([value]) => value === "base:" + wanted)) {
      const run = runs.find(r => r.name === wanted);
      if (run) options.unshift(["base:" + wanted, "base " + run.model]);
    }
    for (const side of ["left", "right"]) {
      const select = document.getElementById(side);
      select.replaceChildren(...options.map(([value, text]) => el("option", { value }, text)));
      select.addEventListener("change", reset);
    }
    if (wanted) {
      document.getElementById("left").value = "base:" + wanted;
      document.getElementById("right").value = "run:" + wanted;
    } else if (options.length > 1) document.getElementById("right").selectedIndex = options.length - 1;
    reset();
  } catch (error) { showError(error); }
  document.getElementById("ask").addEventListener("submit", send);
  document.getElementById("reset").addEventListener("click", reset);
});
