// The owner's status page: progress per labeler and pairwise agreement, refreshed every 5 s.
"use strict";

const $ = (sel, root = document) => root.querySelector(sel);
let token = sessionStorage.getItem("rlhflab.owner");
let timer = null;

function el(tag, props = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(props)) {
    if (k === "class") node.className = v;
    else if (k === "text") node.textContent = v;
    else node.setAttribute(k, v);
  }
  node.append(...children);
  return node;
}

const pct = (x) => (x === null || x === undefined ? "—" : `${(100 * x).toFixed(1)}%`);

function signOut(message = "") {
  sessionStorage.removeItem("rlhflab.owner");
  token = null;
  clearInterval(timer);
  $("#status").hidden = $("#signout").hidden = true;
  $("#signin").hidden = false;
  $("#signin-msg").textContent = message;
}

async function refresh() {
  const res = await fetch("/api/owner/status", { headers: { Authorization: "Bearer " + token } });
  let body;
  try { body = await res.json(); } catch { body = { error: `HTTP ${res.status}` }; }
  if (!res.ok) { signOut(body.error); return false; }
  sessionStorage.setItem("rlhflab.owner", token);
  $("#signin").hidden = true;
  $("#status").hidden = $("#signout").hidden = false;
  render(body);
  return true;
}

function stat(value, label) {
  return el("div", { class: "stat" }, el("b", { text: value }), el("span", { text: label }));
}

function render(s) {
  const done = s.labelers.reduce((a, p) => a + p.done, 0);
  const assigned = s.labelers.reduce((a, p) => a + p.assigned, 0);
  const agr = s.agreement;
  $("#stats").replaceChildren(
    stat(String(s.items.rank), "ranking items"),
    stat(String(s.items.demo), "demonstration items"),
    stat(String(s.labelers.length), "labelers"),
    stat(`${done} / ${assigned}`, "labels done / assigned"),
    stat(pct(agr.overall), `agreement over ${agr.comparisons} comparisons`));
  $("#progress-table tbody").replaceChildren(...s.labelers.map((p) => {
    const frac = p.assigned ? p.done / p.assigned : 0;
    const bar = el("div", { class: "meter" }, el("i"));
    bar.firstChild.style.width = `${100 * frac}%`;
    return el("tr", {},
      el("td", { text: p.name }), el("td", { class: "num", text: String(p.done) }),
      el("td", { class: "num", text: String(p.assigned) }), el("td", { class: "wide" }, bar),
      el("td", { text: p.last_label ? new Date(p.last_label * 1000).toLocaleString() : "—" }));
  }));
  const rows = agr.pairs.map((p) => el("tr", {},
    el("td", { text: `${p.a} · ${p.b}` }), el("td", { class: "num", text: String(p.items) }),
    el("td", { class: "num", text: pct(p.agreement) })));
  if (!rows.length) rows.push(el("tr", {}, el("td", { colspan: "3", class: "sub", text: "No item ranked by two labelers yet." })));
  $("#agreement-table tbody").replaceChildren(...rows);
  $("#updated").textContent = "updated " + new Date().toLocaleTimeString();
}

async function start() {
  if (await refresh()) {
    clearInterval(timer);
    timer = setInterval(refresh, 5000);
  }
}

$("#signin-form").addEventListener("submit", (ev) => {
  ev.preventDefault();
  token = $("#token").value.trim();
  start();
});
$("#signout").addEventListener("click", () => signOut());
if (token) start(); else signOut();
