"use strict";
// The policy simulator page: a thin view. Every number drawn here comes from the
// server (rlhflab.sim.core); this file only sends what the user did and draws the answer.

const COLORS = { Helpful: "#23925a", Sycophantic: "#a24bc4", Hedging: "#d89a1c",
                 Toxic: "#d0453b", Terse: "#3d86c6" };
const LINES = { proxy: "#e0662f", true: "#23925a", capability: "#3d6fd6" };
const STEPS_PER_TICK = 2;   // updates per request while playing
const TICK_MS = 40;
const SVG_NS = "http://www.w3.org/2000/svg";
const token = new URLSearchParams(location.search).get("token");

let config = null;          // styles, presets and limits, from /api/config
let session = null;
let state = null;           // the last answer from the server
let history = [];           // readouts of the current run, one per update
let selected = "Sycophantic";
let playing = false;
let queue = Promise.resolve();
let pending = 0;
let shownParams = "";
let shownEvents = "";

const $ = (id) => document.getElementById(id);
const fmt = (x, d = 3) => Number(x).toFixed(d);
const pct = (x) => (100 * x).toFixed(1) + "%";

// ---- talking to the server: one request at a time, in the order the user acted ----

async function call(action, body) {
  const headers = { "Content-Type": "application/json" };
  if (token) headers["X-Rlhflab-Token"] = token;
  const since = Math.max(0, history.length - 1);
  const res = await fetch("/api/" + action, {
    method: "POST", headers, body: JSON.stringify({ session, since, ...body }) });
  const data = await res.json();
  if (!res.ok) throw new Error(data.error || res.statusText);
  return data;
}

function post(action, body = {}) {
  pending += 1;
  document.body.dataset.pending = pending;
  const p = queue.then(() => call(action, body)).then((data) => {
    apply(data);
    $("status").textContent = "";
    return data;
  }).finally(() => {
    pending -= 1;
    document.body.dataset.pending = pending;
  });
  queue = p.catch(() => {});
  return p;
}

function report(err) {
  $("status").textContent = err.message;
  setPlaying(false);
}

function apply(data) {
  session = data.session;
  history = history.slice(0, data.history_start).concat(data.history);
  state = data;
  render();
}

// ---- drawing ----

function el(tag, attrs = {}, parent = null, text = null) {
  const node = document.createElementNS(SVG_NS, tag);
  for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, v);
  if (text !== null) node.textContent = text;
  if (parent) parent.appendChild(node);
  return node;
}

function render() {
  const r = state.readout;
  $("step").textContent = state.step;
  $("proxy").textContent = fmt(r.proxy);
  $("true").textContent = fmt(r.true);
  $("gap").textContent = fmt(r.gap);
  $("kl").textContent = fmt(r.kl);
  $("capability").textContent = fmt(r.capability);
  $("verdict").textContent = r.verdict;
  $("verdict").className = "verdict " + r.verdict;
  renderParams();
  renderBars();
  renderChart();
  renderTable();
  renderInspector();
  renderLog();
}

function renderParams() {
  const key = JSON.stringify(state.params);
  if (key === shownParams) return;   // never move a slider under the user's pointer
  shownParams = key;
  const p = state.params;
  for (const id of ["beta", "gamma", "lr"]) $(id).value = p[id];
  $("corrupt-style").value = p.corrupt_style;
  $("corrupt-bias").value = p.corrupt_bias;
  showSliderValues();
  for (const b of $("presets").querySelectorAll("button")) {
    b.classList.toggle("active", JSON.stringify(config.presets[b.dataset.preset].params) === key);
  }
}

function showSliderValues() {
  $("beta-val").textContent = fmt($("beta").value, 2);
  $("gamma-val").textContent = fmt($("gamma").value, 2);
  $("lr-val").textContent = fmt($("lr").value, 1);
  const b = Number($("corrupt-bias").value);
  $("corrupt-bias-val").textContent = (b > 0 ? "+" : "") + fmt(b, 2);
}

function renderBars() {
  const svg = $("bars");
  svg.replaceChildren();
  const left = 40, right = 440, top = 22, base = 222;
  const y = (v) => base - v * (base - top);
  const slot = (right - left) / state.styles.length, w = 44;
  for (const t of [0, 0.25, 0.5, 0.75, 1]) {
    el("line", { x1: left, x2: right, y1: y(t), y2: y(t), stroke: "#e3e6ea" }, svg);
    el("text", { x: left - 6, y: y(t) + 4, "text-anchor": "end", "font-size": 11.5, fill: "#6b7280" },
       svg, (100 * t) + "%");
  }
  state.styles.forEach((s, i) => {
    const cx = left + slot * (i + 0.5), x = cx - w / 2;
    const g = el("g", { class: "bar", "data-style": s.name }, svg);
    if (s.name === selected) {
      el("rect", { x: cx - slot / 2 + 3, y: 4, width: slot - 6, height: 268, rx: 6, fill: "#eef2fb" }, g);
    }
    el("rect", { x, y: y(s.share), width: w, height: base - y(s.share), rx: 2,
                 fill: COLORS[s.name], "fill-opacity": 0.85 }, g);
    el("rect", { x: x + 0.75, y: y(s.sft_share), width: w - 1.5, height: base - y(s.sft_share),
                 fill: "none", stroke: "#444", "stroke-width": 1.2, "stroke-dasharray": "4 3" }, g);
    const corrupt = Math.abs(s.rm - s.rm_base) > 1e-9;
    const rmColor = corrupt ? "#d0453b" : "#1d2230";
    el("line", { x1: x - 8, x2: x + w + 8, y1: y(s.rm), y2: y(s.rm), stroke: rmColor,
                 "stroke-width": 2.5 }, g);
    el("text", { x: cx, y: y(s.rm) - 5, "text-anchor": "middle", "font-size": 12, fill: rmColor,
                 "font-weight": corrupt ? 700 : 400, stroke: "#fff", "stroke-width": 3,
                 "paint-order": "stroke" }, g, "RM " + fmt(s.rm, 2));
    el("text", { x: cx, y: base + 18, "text-anchor": "middle", "font-size": 13,
                 "font-weight": s.name === selected ? 700 : 500, fill: "#1d2230" }, g, s.name);
    el("text", { x: cx, y: base + 36, "text-anchor": "middle", "font-size": 13, fill: "#414857" },
       g, pct(s.share));
    const hit = el("rect", { class: "bar-hit", x: cx - slot / 2 + 3, y: 4, width: slot - 6,
                             height: 268, fill: "transparent" }, g);
    hit.addEventListener("click", () => select(s.name));
  });
  el("line", { x1: left, x2: right, y1: base, y2: base, stroke: "#9aa1ad" }, svg);
}

function renderChart() {
  const svg = $("chart");
  svg.replaceChildren();
  const left = 44, right = 606, top = 12, bottom = 328;
  const last = history.length ? history[history.length - 1].step : 0;
  const xmax = Math.max(100, Math.ceil(last / 100) * 100);
  const x = (s) => left + (s / xmax) * (right - left);
  const y = (v) => bottom - Math.max(0, Math.min(1, v)) * (bottom - top);
  // Where the verdict was 'hacking': shaded bands.
  let start = null;
  history.forEach((h, i) => {
    const hacking = h.verdict === "hacking";
    if (hacking && start === null) start = h.step;
    const end = i === history.length - 1 || history[i + 1].verdict !== "hacking";
    if (hacking && end) {
      el("rect", { x: x(start), y: top, width: Math.max(1, x(h.step) - x(start)),
                   height: bottom - top, fill: "rgba(208,69,59,0.12)" }, svg);
      start = null;
    }
  });
  for (let t = 0; t <= 1.0001; t += 0.2) {
    el("line", { x1: left, x2: right, y1: y(t), y2: y(t), stroke: "#e3e6ea" }, svg);
    el("text", { x: left - 6, y: y(t) + 4, "text-anchor": "end", "font-size": 12, fill: "#6b7280" },
       svg, fmt(t, 1));
  }
  const xstep = xmax / 5;
  for (let s = 0; s <= xmax; s += xstep) {
    el("line", { x1: x(s), x2: x(s), y1: bottom, y2: bottom + 4, stroke: "#9aa1ad" }, svg);
    el("text", { x: x(s), y: bottom + 17, "text-anchor": "middle", "font-size": 12, fill: "#6b7280" },
       svg, String(Math.round(s)));
  }
  el("text", { x: (left + right) / 2, y: bottom + 35, "text-anchor": "middle", "font-size": 13,
               fill: "#414857" }, svg, "update");
  el("line", { x1: left, x2: right, y1: bottom, y2: bottom, stroke: "#9aa1ad" }, svg);
  // The user's changes in this run: dotted verticals.
  for (const e of state.events) {
    if (e.kind !== "user" || e.run !== state.run || e.step === 0) continue;
    el("line", { x1: x(e.step), x2: x(e.step), y1: top, y2: bottom, stroke: "#555",
                 "stroke-width": 1, "stroke-dasharray": "2 3" }, svg);
  }
  for (const [key, color] of Object.entries(LINES)) {
    const pts = history.map((h) => `${x(h.step).toFixed(1)},${y(h[key]).toFixed(1)}`).join(" ");
    el("polyline", { points: pts, fill: "none", stroke: color, "stroke-width": 2.4,
                     "stroke-linejoin": "round",
                     "stroke-dasharray": key === "capability" ? "7 5" : "none" }, svg);
  }
}

function renderTable() {
  const body = $("style-table").querySelector("tbody");
  body.replaceChildren();
  for (const s of state.styles) {
    const tr = document.createElement("tr");
    tr.dataset.style = s.name;
    if (s.name === selected) tr.className = "selected";
    const corrupt = Math.abs(s.rm - s.rm_base) > 1e-9;
    const cells = [s.name, pct(s.share), pct(s.sft_share),
                   corrupt ? `${fmt(s.rm_base, 2)} → ${fmt(s.rm, 2)}` : fmt(s.rm, 2),
                   fmt(s.true, 2), pct(s.pretrain)];
    cells.forEach((text, i) => {
      const td = document.createElement("td");
      if (i === 0) {
        const dot = document.createElement("i");
        dot.className = "dot";
        dot.style.background = COLORS[s.name];
        td.append(dot, " " + text);
      } else {
        td.textContent = text;
      }
      if (i === 3 && corrupt) td.className = "corrupt";
      tr.appendChild(td);
    });
    tr.addEventListener("click", () => select(s.name));
    body.appendChild(tr);
  }
}

function renderInspector() {
  const s = state.styles.find((t) => t.name === selected);
  $("inspect-name").textContent = s.name;
  $("inspect-dot").style.background = COLORS[s.name];
  const rm = Math.abs(s.rm - s.rm_base) > 1e-9 ? `RM ${fmt(s.rm, 2)} (was ${fmt(s.rm_base, 2)})`
                                               : `RM ${fmt(s.rm, 2)}`;
  $("inspect-facts").textContent =
    `share ${pct(s.share)} (π_SFT ${pct(s.sft_share)}) · ${rm} · true ${fmt(s.true, 2)}`;
}

function renderLog() {
  const key = JSON.stringify(state.events);
  if (key === shownEvents) return;
  shownEvents = key;
  const log = $("log");
  log.replaceChildren();
  for (const e of [...state.events].reverse()) {
    const li = document.createElement("li");
    li.className = e.kind + (e.text.includes("→ hacking") ? " hacking" : "");
    const where = document.createElement("span");
    where.className = "where";
    where.textContent = `update ${e.step}`;
    const text = document.createElement("span");
    text.className = "text";
    text.textContent = e.text;
    li.append(where, text);
    if (e.followed) {
      const f = document.createElement("span");
      f.className = "followed";
      f.textContent = e.followed;
      li.appendChild(f);
    }
    log.appendChild(li);
  }
}

function select(name) {
  selected = name;
  if (state) render();
}

// ---- controls ----

function setPlaying(on) {
  playing = on;
  $("play").disabled = on;
  $("pause").disabled = !on;
  $("play").classList.toggle("active", on);
  document.body.dataset.playing = on ? "1" : "0";
}

async function loop() {
  while (playing) {
    try {
      await post("step", { n: STEPS_PER_TICK });
    } catch (err) {
      report(err);
      return;
    }
    await new Promise((resolve) => setTimeout(resolve, TICK_MS));
  }
}

function sendParams(params) {
  post("params", { params }).catch((err) => {
    report(err);
    shownParams = "";           // put the sliders back where the server has them
    if (state) renderParams();
  });
}

async function init() {
  const headers = token ? { "X-Rlhflab-Token": token } : {};
  config = await (await fetch("/api/config", { headers })).json();
  for (const [name, p] of Object.entries(config.presets)) {
    const b = document.createElement("button");
    b.dataset.preset = name;
    const q = p.params;
    const rm = q.corrupt_style && q.corrupt_bias
      ? ` · RM ${q.corrupt_bias > 0 ? "+" : ""}${fmt(q.corrupt_bias, 2)} ${q.corrupt_style}` : "";
    const what = document.createElement("small");
    what.textContent = `β ${fmt(q.beta, 2)} · γ ${fmt(q.gamma, 2)}${rm}`;
    b.append(p.title, what);
    b.addEventListener("click", () => post("preset", { name }).catch(report));
    $("presets").appendChild(b);
  }
  const sel = $("corrupt-style");
  for (const name of ["", ...config.styles]) {
    const o = document.createElement("option");
    o.value = name;
    o.textContent = name || "(none)";
    sel.appendChild(o);
  }
  $("play").addEventListener("click", () => { setPlaying(true); loop(); });
  $("pause").addEventListener("click", () => setPlaying(false));
  $("step-btn").addEventListener("click", () => post("step", { n: 1 }).catch(report));
  $("reset").addEventListener("click", () => post("reset").catch(report));
  for (const id of ["beta", "gamma", "lr", "corrupt-bias"]) {
    $(id).addEventListener("input", showSliderValues);
  }
  for (const id of ["beta", "gamma", "lr"]) {
    $(id).addEventListener("change", () => sendParams({ [id]: Number($(id).value) }));
  }
  const corrupt = () => sendParams({ corrupt_style: sel.value,
                                     corrupt_bias: Number($("corrupt-bias").value) });
  sel.addEventListener("change", corrupt);
  $("corrupt-bias").addEventListener("change", corrupt);
  $("nudge-down").addEventListener("click", () =>
    post("nudge", { style: selected, delta: -0.05 }).catch(report));
  $("nudge-up").addEventListener("click", () =>
    post("nudge", { style: selected, delta: 0.05 }).catch(report));
  setPlaying(false);
  await post("session");
  document.body.dataset.ready = "1";
}

init().catch((err) => { $("status").textContent = "could not start: " + err.message; });
