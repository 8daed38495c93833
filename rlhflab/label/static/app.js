// The labeler app: sign in with a token, then rank responses or write demonstrations.
// All text from the server goes through textContent, never innerHTML.
"use strict";

const $ = (sel, root = document) => root.querySelector(sel);
const LETTERS = "ABCDEFGHIJKLMNOP";
const LIKERT = ["Terrible", "Very poor", "Poor", "Fair", "Good", "Very good", "Excellent"];
const state = { token: sessionStorage.getItem("rlhflab.token"), me: null, tasks: [], edit: null };

function el(tag, props = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(props)) {
    if (k === "class") node.className = v;
    else if (k === "text") node.textContent = v;
    else if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
    else if (k === "dataset") Object.assign(node.dataset, v);
    else if (v !== false && v !== null && v !== undefined) node.setAttribute(k, v === true ? "" : v);
  }
  for (const c of children.flat()) if (c !== null && c !== undefined) node.append(c);
  return node;
}

async function api(path, options = {}) {
  const res = await fetch(path, {
    ...options,
    headers: { Authorization: "Bearer " + state.token, "Content-Type": "application/json" },
  });
  let body;
  try { body = await res.json(); } catch { body = { error: `HTTP ${res.status}` }; }
  if (res.status === 401) { signOut(body.error); throw new Error(body.error); }
  return { ok: res.ok, status: res.status, body };
}

function toast(text, kind = "ok") {
  const t = $("#toast");
  t.textContent = text;
  t.className = "toast " + kind;
  t.hidden = false;
  clearTimeout(toast.timer);
  toast.timer = setTimeout(() => { t.hidden = true; }, 2500);
}

// -- sign in ---------------------------------------------------------------------------

function signOut(message = "") {
  sessionStorage.removeItem("rlhflab.token");
  state.token = null;
  $("#app").hidden = true;
  $("#signout").hidden = $("#progress").hidden = true;
  $("#who").textContent = "";
  $("#signin").hidden = false;
  $("#signin-msg").textContent = message;
  $("#token").focus();
}

async function signIn(token) {
  state.token = token;
  const r = await api("/api/me").catch(() => null);
  if (!r) return;
  if (!r.ok) { signOut(r.body.error); return; }
  sessionStorage.setItem("rlhflab.token", token);
  state.me = r.body;
  $("#signin").hidden = true;
  $("#app").hidden = false;
  $("#signout").hidden = $("#progress").hidden = false;
  $("#who").textContent = "signed in as " + r.body.labeler;
  await refreshTasks();
  const next = state.tasks.find((t) => !t.done) || state.tasks[0];
  if (next) openTask(next.id); else showEmpty("No tasks are assigned to you yet.");
}

// -- task list -------------------------------------------------------------------------

async function refreshTasks() {
  const r = await api("/api/tasks");
  state.tasks = r.body.tasks || [];
  const done = state.tasks.filter((t) => t.done).length;
  $("#progress span").textContent = `${done} of ${state.tasks.length} done`;
  $("#progress i").style.width = state.tasks.length ? `${(100 * done) / state.tasks.length}%` : "0";
  const list = $("#task-list");
  list.replaceChildren(...state.tasks.map((t) => el("li", {},
    el("button", {
      type: "button", class: "task-link" + (t.done ? " done" : ""), dataset: { task: t.id },
      onclick: () => openTask(t.id),
    },
      el("span", { class: "kind " + t.kind, text: t.kind === "rank" ? "Rank" : "Write" }),
      el("span", { class: "preview", text: t.preview }),
      el("span", { class: "check", text: t.done ? "✓" : "" })))));
  markCurrent();
}

function markCurrent() {
  for (const b of document.querySelectorAll(".task-link")) {
    b.classList.toggle("current", state.edit && Number(b.dataset.task) === state.edit.id);
  }
}

function showEmpty(text) {
  state.edit = null;
  $("#task").replaceChildren(el("div", { class: "empty" }, el("h2", { text })));
}

async function openTask(id) {
  const r = await api(`/api/tasks/${id}`);
  if (!r.ok) { toast(r.body.error, "error"); return; }
  const task = r.body;
  state.edit = { id, task, order: [], flags: {}, likert: null };
  for (const name of Object.keys(state.me.flags)) state.edit.flags[name] = new Set();
  if (task.label && task.kind === "rank") loadLabel(task.label);
  renderTask();
  markCurrent();
  window.scrollTo(0, 0);
}

function loadLabel(label) {
  const e = state.edit;
  for (const entry of label.ranking) {
    const group = Array.isArray(entry) ? entry : [entry];
    group.forEach((idx, j) => e.order.push({ idx, tie: j > 0 }));
  }
  for (const [name, idx] of Object.entries(label.flags)) e.flags[name] = new Set(idx);
  e.likert = label.likert;
}

function renderTask() {
  const { task } = state.edit;
  const head = el("div", { class: "task-head" },
    el("span", { class: "kind " + task.kind, text: task.kind === "rank" ? "Ranking" : "Demonstration" }),
    el("h1", { text: `Task #${task.id}` }),
    task.label ? el("span", { class: "final", text: "Submitted · labels are final" }) : null);
  const prompt = el("section", { class: "prompt" },
    el("h3", { text: "Prompt" }), el("div", { class: "text", id: "prompt-text", text: task.prompt }));
  const body = task.kind === "rank" ? renderRank() : renderDemo();
  $("#task").replaceChildren(head, prompt, body);
}

// -- ranking -----------------------------------------------------------------------------

function groupsOf(order) {
  const groups = [];
  for (const { idx, tie } of order) {
    if (tie && groups.length) groups[groups.length - 1].push(idx); else groups.push([idx]);
  }
  return groups;
}

function rankOf(idx) {
  const g = groupsOf(state.edit.order).findIndex((grp) => grp.includes(idx));
  return g < 0 ? null : g + 1;
}

function renderRank() {
  const e = state.edit, k = e.task.responses.length, locked = !!e.task.label;
  const help = el("p", { class: "help" }, locked ? "Your submitted ranking:" :
    `Click the ${k} responses from best to worst, or drag rows in "Your ranking" to reorder. ` +
    "Tick “=” on a row to tie it with the row above. Flag any problems on each response.");
  const cards = e.task.responses.map((text, i) => renderCard(i, text, locked));
  const panel = el("aside", { class: "panel ranking-panel" },
    el("h3", {}, "Your ranking ", el("small", { text: "best first" })),
    renderRankingList(locked),
    el("h3", {}, "Overall quality ", el("small", { text: "of your top choice" })),
    el("div", { class: "likert", role: "radiogroup", "aria-label": "overall quality 1 to 7" },
      LIKERT.map((name, j) => el("button", {
        type: "button", class: "likert-btn" + (e.likert === j + 1 ? " on" : ""),
        role: "radio", "aria-checked": String(e.likert === j + 1), title: name,
        dataset: { likert: j + 1 }, disabled: locked,
        onclick: () => { e.likert = j + 1; renderTask(); },
      }, el("b", { text: String(j + 1) })))),
    el("div", { class: "likert-scale" }, el("span", { text: "1 terrible" }), el("span", { text: "7 excellent" })),
    locked ? null : el("button", {
      type: "button", class: "primary wide", id: "submit", disabled: !!blocker(),
      onclick: submitRanking,
    }, "Submit ranking"),
    el("p", { class: "msg" + (locked ? "" : " hint"), id: "rank-msg", text: locked ? "" : blocker() || "Ready to submit." }));
  return el("div", {}, help, el("div", { class: "rank-layout" }, el("div", { class: "responses" }, cards), panel));
}

function blocker() {
  const e = state.edit, k = e.task.responses.length;
  if (e.order.length < k) return `Rank all ${k} responses (${k - e.order.length} left).`;
  if (groupsOf(e.order).length < 2) return "Not everything can be tied: order at least two groups.";
  if (!e.likert) return "Choose an overall quality from 1 to 7.";
  return "";
}

function renderCard(i, text, locked) {
  const e = state.edit, rank = rankOf(i);
  const flags = Object.entries(state.me.flags).map(([name, title]) => {
    const on = e.flags[name].has(i);
    return el("button", {
      type: "button", class: "chip" + (on ? " on" : ""), "aria-pressed": String(on),
      dataset: { flag: name, idx: i }, disabled: locked, title,
      onclick: (ev) => {
        ev.stopPropagation();
        if (on) e.flags[name].delete(i); else e.flags[name].add(i);
        renderTask();
      },
    }, title);
  });
  const action = locked ? null : el("button", {
    type: "button", class: "rank-btn" + (rank ? " ranked" : ""), dataset: { rankBtn: i },
    onclick: (ev) => { ev.stopPropagation(); toggleRanked(i); },
  }, rank ? "Unrank" : `Rank as #${groupsOf(e.order).length + 1}`);
  return el("article", {
    class: "card" + (rank ? " is-ranked" : ""), dataset: { idx: i },
    onclick: () => { if (!locked && !rank) toggleRanked(i); },
  },
    el("header", {},
      el("span", { class: "letter", text: LETTERS[i] }),
      el("span", { class: "rank-badge" + (rank ? " on" : ""), text: rank ? `#${rank}` : "unranked" }),
      action),
    el("div", { class: "text", text }),
    el("footer", { class: "flags" }, flags));
}

function toggleRanked(i) {
  const e = state.edit, pos = e.order.findIndex((r) => r.idx === i);
  if (pos < 0) e.order.push({ idx: i, tie: false });
  else { e.order.splice(pos, 1); if (e.order[0]) e.order[0].tie = false; }
  renderTask();
}

function renderRankingList(locked) {
  const e = state.edit;
  if (!e.order.length) return el("p", { class: "empty-rank", text: "Nothing ranked yet: click the best response first." });
  const rows = e.order.map((r, pos) => {
    const rank = rankOf(r.idx);
    const row = el("li", {
      class: "rank-row" + (r.tie ? " tied" : ""), draggable: locked ? false : "true",
      dataset: { pos, idx: r.idx },
    },
      el("span", { class: "grip", text: locked ? "" : "⋮⋮", "aria-hidden": "true" }),
      el("span", { class: "pos", text: String(rank) }),
      el("span", { class: "letter small", text: LETTERS[r.idx] }),
      el("span", { class: "snippet", text: e.task.responses[r.idx] }),
      pos === 0 || locked ? (r.tie ? el("span", { class: "tie-tag", text: "=" }) : null) : el("label", {
        class: "tie", title: "Tied with the response above",
      }, el("input", {
        type: "checkbox", checked: r.tie, dataset: { tie: r.idx },
        onchange: (ev) => { r.tie = ev.target.checked; renderTask(); },
      }), "="),
      locked ? null : el("span", { class: "moves" },
        el("button", { type: "button", class: "mv", title: "Move up", "aria-label": "move up", disabled: pos === 0, onclick: () => move(pos, pos - 1) }, "↑"),
        el("button", { type: "button", class: "mv", title: "Move down", "aria-label": "move down", disabled: pos === e.order.length - 1, onclick: () => move(pos, pos + 1) }, "↓"),
        el("button", { type: "button", class: "mv", title: "Remove from ranking", "aria-label": "remove", onclick: () => toggleRanked(r.idx) }, "×")));
    if (!locked) addDrag(row, pos);
    return row;
  });
  return el("ol", { class: "ranking", id: "ranking" }, rows);
}

function move(from, to) {
  const o = state.edit.order;
  if (to < 0 || to >= o.length || from === to) return;
  const [item] = o.splice(from, 1);
  item.tie = false;  // a moved response starts its own group
  o.splice(to, 0, item);
  o[0].tie = false;
  renderTask();
}

function addDrag(row, pos) {
  row.addEventListener("dragstart", (ev) => {
    ev.dataTransfer.setData("text/plain", String(pos));
    ev.dataTransfer.effectAllowed = "move";
    row.classList.add("dragging");
  });
  row.addEventListener("dragend", () => row.classList.remove("dragging"));
  row.addEventListener("dragover", (ev) => { ev.preventDefault(); row.classList.add("drop"); });
  row.addEventListener("dragleave", () => row.classList.remove("drop"));
  row.addEventListener("drop", (ev) => {
    ev.preventDefault();
    const from = Number(ev.dataTransfer.getData("text/plain"));
    if (!Number.isNaN(from)) move(from, pos);
  });
}

async function submitRanking() {
  const e = state.edit;
  if (blocker()) return;
  const ranking = groupsOf(e.order).map((g) => (g.length === 1 ? g[0] : g));
  const flags = Object.fromEntries(Object.entries(e.flags).map(([n, s]) => [n, [...s].sort((a, b) => a - b)]));
  await submit({ ranking, likert: e.likert, flags }, "Ranking saved");
}

// -- demonstration -----------------------------------------------------------------------

function renderDemo() {
  const e = state.edit, locked = !!e.task.label, max = state.me.max_completion;
  const area = el("textarea", {
    id: "completion", rows: 12, maxlength: max, readonly: locked,
    placeholder: "Write the response an ideal assistant would give…",
  });
  area.value = locked ? e.task.label.completion : (e.draft || "");
  const count = el("span", { class: "count", text: `${area.value.length} / ${max}` });
  area.addEventListener("input", () => {
    e.draft = area.value;
    count.textContent = `${area.value.length} / ${max}`;
    $("#submit").disabled = !area.value.trim();
  });
  return el("section", { class: "panel answer" },
    el("h3", { text: "Your response" }),
    el("p", { class: "help", text: locked ? "Your submitted demonstration:" :
      "Answer the prompt as a helpful, honest and harmless assistant would. Follow its instructions exactly." }),
    area,
    el("div", { class: "answer-foot" }, count, locked ? null : el("button", {
      type: "button", class: "primary", id: "submit", disabled: !area.value.trim(),
      onclick: () => submit({ completion: area.value }, "Demonstration saved"),
    }, "Submit demonstration")),
    el("p", { class: "msg", id: "rank-msg" }));
}

// -- submit --------------------------------------------------------------------------------

async function submit(body, okText) {
  const id = state.edit.id;
  $("#submit").disabled = true;
  const r = await api(`/api/tasks/${id}/label`, { method: "POST", body: JSON.stringify(body) });
  if (!r.ok) {
    const msg = $("#rank-msg");
    msg.textContent = r.body.error;
    msg.className = "msg error";
    $("#submit").disabled = false;
    return;
  }
  toast(okText + " ✓");
  await refreshTasks();
  const later = state.tasks.find((t) => !t.done && t.id > id) || state.tasks.find((t) => !t.done);
  if (later) openTask(later.id); else showEmpty("All done — thank you! Every task assigned to you is labeled.");
}

// -- start ---------------------------------------------------------------------------------

$("#signin-form").addEventListener("submit", (ev) => {
  ev.preventDefault();
  signIn($("#token").value.trim());
});
$("#signout").addEventListener("click", () => signOut());
if (state.token) signIn(state.token); else signOut();
