// Shared by every page: JSON requests, a tiny element builder, the navigation bar and number formatting.
"use strict";

async function api(url, options = {}) {
  const init = { ...options, headers: { "Content-Type": "application/json", ...(options.headers || {}) } };
  if (init.body && typeof init.body !== "string") init.body = JSON.stringify(init.body);
  const response = await fetch(url, init);
  const data = await response.json().catch(() => ({ error: response.statusText }));
  if (!response.ok) throw new Error(data.error || response.statusText);
  return data;
}

// el("td", {class: "x"}, "text", child...) — text is always set as text, never parsed as HTML.
function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs)) {
    if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
    else if (value !== null && value !== undefined && value !== false) node.setAttribute(key, value === true ? "" : value);
  }
  for (const child of children.flat()) {
    if (child === null || child === undefined) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

function param(name) {
  return new URLSearchParams(location.search).get(name);
}

function fmt(value, digits = 4) {
  if (value === null || value === undefined) return "–";
  if (typeof value !== "number") return String(value);
  if (Number.isInteger(value)) return String(value);
  const abs = Math.abs(value);
  if (abs !== 0 && (abs < 1e-3 || abs >= 1e5)) return value.toExponential(2);
  return String(parseFloat(value.toPrecision(digits)));  // 0.002, not 0.002000
}

function runLink(name) {
  return el("a", { href: "/run?run=" + encodeURIComponent(name) }, name);
}

function statusBadge(status) {
  return el("span", { class: "badge " + status.state, title: status.detail || "" }, status.state);
}

function showError(error) {
  const box = document.getElementById("error");
  box.textContent = error ? String(error.message || error) : "";
  box.hidden = !error;
}

document.addEventListener("DOMContentLoaded", () => {
  const links = [["/", "Runs"], ["/compare", "Compare"], ["/review", "Review"], ["/playground", "Playground"]];
  const nav = el("nav", {}, el("strong", {}, "tuneforge"),
    links.map(([href, text]) => el("a", { href, class: location.pathname === href ? "current" : null }, text)));
  document.body.prepend(nav, el("div", { id: "error", class: "error", hidden: true }));
});
