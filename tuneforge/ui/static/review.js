// The blind review: a form to start one, the rating cards (answers by position only), and the un-blinded summary.
"use strict";

const run = param("run"), reviewId = param("review");
const query = () => `run=${encodeURIComponent(run)}&review=${encodeURIComponent(reviewId)}`;
let criteria = [];

async function startForm() {
  document.getElementById("start").hidden = false;
  const runs = await api("/api/runs");
  const runSelect = document.getElementById("run-select");
  runSelect.replaceChildren(...runs.map(r => el("option", { value: r.name, selected: r.name === run }, r.name)));
  const systems = runs.filter(r => r.has_weights).map(r => ["run:" + r.name, "run " + r.name]);
  const fill = async () => {
    const chosen = runSelect.value;
    const options = [["base:" + chosen, "base model of " + chosen], ...systems];
    document.getElementById("system-a").replaceChildren(...options.map(([v, t]) => el("option", { value: v }, t)));
    document.getElementById("system-b").replaceChildren(...options.map(([v, t]) =>
      el("option", { value: v, selected: v === "run:" + chosen }, t)));
    const info = await api("/api/run?run=" + encodeURIComponent(chosen));
    document.getElementById("data-file").replaceChildren(el("option", { value: "" }, "(upload one instead)"),
      ...info.data_files.map(f => el("option", { value: f }, f)));
  };
  runSelect.addEventListener("change", () => fill().catch(showError));
  await fill();
  document.getElementById("new-review").addEventListener("submit", async event => {
    event.preventDefault();
    const form = new FormData(event.target);
    const body = { run: form.get("run"), A: form.get("A"), B: form.get("B"), data_file: form.get("data_file"),
                   limit: Number(form.get("limit")), max_new_tokens: Number(form.get("max_new_tokens")) };
    const upload = document.getElementById("upload").files[0];
    if (upload) { body.data_text = await upload.text(); body.data_name = upload.name; }
    try {
      const created = await api("/api/reviews", { method: "POST", body });
      location.href = `/review?run=${encodeURIComponent(body.run)}&review=${encodeURIComponent(created.id)}`;
    } catch (error) { showError(error); }
  });
}

function scoreSelect(name, value) {
  return el("select", { name }, el("option", { value: "" }, "–"),
    [1, 2, 3, 4, 5].map(n => el("option", { value: n, selected: value === n }, n)));
}

function card(item) {
  const saved = item.saved;
  const answers = item.answers.map((text, i) => {
    const position = String(i + 1);
    return el("div", { class: "answer", "data-position": position }, el("strong", {}, "Answer " + position),
      el("pre", {}, text || "(empty answer)"),
      el("div", { class: "scores" }, criteria.map(c => el("div", {}, el("label", {}, c),
        scoreSelect(`${c}-${position}`, saved ? saved.ratings[position][c] : null)))));
  });
  const preference = ["1", "2", "tie"].map(choice => el("label", {},
    el("input", { type: "radio", name: `preferred-${item.index}`, value: choice,
                  checked: saved && saved.preferred === choice }),
    choice === "tie" ? " tie  " : ` answer ${choice}  `));
  const node = el("div", { class: "card" + (saved ? " saved" : ""), "data-prompt": item.index },
    el("div", { class: "prompt" }, el("strong", {}, `Prompt ${item.index + 1}`),
      item.prompt.map(m => el("pre", {}, `${m.role}: ${m.content}`))),
    el("div", { class: "pair" }, answers),
    el("p", {}, "Preferred: ", preference, el("button", { class: "save", onclick: () => save(node, item.index) }, "Save"),
      el("span", { class: "state muted" }, saved ? " saved" : "")));
  return node;
}

async function save(node, index) {
  const ratings = { 1: {}, 2: {} };
  for (const position of ["1", "2"]) for (const c of criteria) {
    const value = node.querySelector(`select[name="${c}-${position}"]`).value;
    ratings[position][c] = value === "" ? null : Number(value);
  }
  const preferred = node.querySelector(`input[name="preferred-${index}"]:checked`);
  try {
    await api("/api/rating?" + query(), { method: "POST",
      body: { prompt: index, ratings, preferred: preferred ? preferred.value : null } });
    node.classList.add("saved");
    node.querySelector(".state").textContent = " saved";
    showError(null);
    countRated();
  } catch (error) { showError(error); }
}

function countRated() {
  const cards = document.querySelectorAll(".card[data-prompt]");
  const done = document.querySelectorAll(".card.saved[data-prompt]").length;
  document.getElementById("rated-count").textContent = `${done} of ${cards.length} prompts rated`;
}

async function showSheet() {
  const review = await api("/api/review?" + query());
  document.getElementById("title").textContent = `Blind review ${review.id} · ${review.source}`;
  if (review.state !== "ready") {
    document.getElementById("progress").hidden = false;
    document.getElementById("progress-text").textContent = review.state === "failed"
      ? "Generating the answers failed: " + review.error : `Generating answers: ${review.progress}…`;
    if (review.state !== "failed") setTimeout(() => showSheet().catch(showError), 1000);
    return;
  }
  document.getElementById("progress").hidden = true;
  criteria = review.criteria;
  document.getElementById("sheet").hidden = false;
  document.getElementById("summary-link").href = `/review?${query()}&summary=1`;
  document.getElementById("cards").replaceChildren(...review.items.map(card));
  countRated();
}

function interval(stat) {
  if (stat.mean === null) return "–";
  const ci = stat.low === null ? "(n=1, no interval)" : `[${stat.low.toFixed(2)}, ${stat.high.toFixed(2)}]`;
  return `${stat.mean.toFixed(2)} ${ci}`;
}

async function showSummary() {
  const data = await api("/api/review/summary?" + query());
  const s = data.summary, systems = ["A", "B"];
  const name = sys => data.systems[sys].label;
  const section = document.getElementById("summary");
  section.hidden = false;
  document.getElementById("title").textContent = `Review summary ${reviewId}`;
  section.replaceChildren(
    el("p", {}, `${s.prompts_rated} of ${data.prompts} prompts rated. Means with ${s.interval}. `,
      el("a", { href: "/review?" + query() }, "Back to the ratings")),
    el("table", { id: "summary-table" },
      el("tr", {}, el("th", {}, "criterion"), systems.map(sys => el("th", {}, `${sys}: ${name(sys)}`))),
      Object.entries(s.criteria).map(([c, bySystem]) => el("tr", {}, el("th", {}, c), systems.map(sys =>
        el("td", { class: "num", "data-criterion": c, "data-system": sys, "data-mean": bySystem[sys].mean },
          interval(bySystem[sys])))))),
    el("h2", {}, "Preference"),
    el("table", { id: "win-table" },
      el("tr", {}, el("th", {}, "system"), el("th", {}, "preferred"), el("th", {}, "win rate")),
      systems.map(sys => el("tr", {}, el("td", {}, `${sys}: ${name(sys)}`), el("td", { class: "num" }, s.preferred[sys]),
        el("td", { class: "num", "data-win-rate": sys }, s.win_rate[sys] === null ? "–" : (100 * s.win_rate[sys]).toFixed(1) + "%"))),
      el("tr", {}, el("td", {}, "tie"), el("td", { class: "num", "data-ties": "" }, s.preferred.tie), el("td", {}, ""))),
    el("p", { class: "muted" }, `Win rate = ${s.win_rate_rule}: a tie counts half to each system.`),
    el("h2", {}, "Per prompt"),
    el("table", {}, el("tr", {}, el("th", {}, "#"), el("th", {}, "prompt"), systems.map(sys => el("th", {}, name(sys))),
      el("th", {}, "preferred")),
      data.rated.map(r => el("tr", {}, el("td", {}, r.index + 1), el("td", {}, r.question),
        systems.map(sys => el("td", {}, r.answers[sys])), el("td", {}, r.preferred === "tie" ? "tie" : name(r.preferred))))));
}

document.addEventListener("DOMContentLoaded", () => {
  const shown = !reviewId ? startForm() : param("summary") ? showSummary() : showSheet();
  shown.catch(showError);
});
