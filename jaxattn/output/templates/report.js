/* jaxattn report.html viewer: plain JS, no libraries, no network.
 *
 * The data lives in the JSON script element #jaxattn-data (written by
 * jaxattn/output/html_data.py). Attention arrays are packed as the causal lower triangle of
 * each [T, T] matrix (row i holds keys 0..i at offset i(i+1)/2), each row as uint8 steps of its
 * maximum (a float16 "scale" per row), deflated and base64-encoded; heads with identical arrays
 * share one slab. Per-query metrics are float16.
 */
"use strict";

const DATA = JSON.parse(document.getElementById("jaxattn-data").textContent);
const state = { option: null, layer: 0, head: 0, seq: 0, query: null, scale: "row" };
const arrays = {};

// ---------- decoding ----------

function base64Bytes(text) {
  const bin = atob(text);
  const out = new Uint8Array(bin.length);
  for (let i = 0; i < bin.length; i++) out[i] = bin.charCodeAt(i);
  return out;
}

async function inflate(bytes) {
  const stream = new Blob([bytes]).stream().pipeThrough(new DecompressionStream("deflate"));
  return new Uint8Array(await new Response(stream).arrayBuffer());
}

let F16_TABLE = null;
function float16Values(bytes) {
  if (!F16_TABLE) {
    F16_TABLE = new Float32Array(65536);
    for (let h = 0; h < 65536; h++) {
      const sign = h & 0x8000 ? -1 : 1, exp = (h >> 10) & 0x1f, frac = h & 0x3ff;
      F16_TABLE[h] = exp === 0 ? sign * 2 ** -14 * (frac / 1024)
        : exp === 31 ? (frac ? NaN : sign * Infinity)
        : sign * 2 ** (exp - 15) * (1 + frac / 1024);
    }
  }
  const u16 = new Uint16Array(bytes.buffer, bytes.byteOffset, bytes.byteLength / 2);
  const out = new Float32Array(u16.length);
  for (let i = 0; i < u16.length; i++) out[i] = F16_TABLE[u16[i]];
  return out;
}

async function decodeSlab(slab) {
  let bytes = base64Bytes(slab.data);
  if (slab.compression === "deflate") bytes = await inflate(bytes);
  return slab.dtype === "float16" ? float16Values(bytes) : bytes;
}

// ---------- small helpers ----------

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === "class") node.className = v;
    else if (k === "text") node.textContent = v;
    else if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
    else node.setAttribute(k, v);
  }
  for (const c of children) node.append(c);
  return node;
}

/** A token as shown on screen: whitespace made visible. */
function shown(tok) {
  return tok.replace(/ /g, "\u2423").replace(/\n/g, "\u23ce").replace(/\t/g, "\u21e5");
}

const VIRIDIS = [[68, 1, 84], [59, 82, 139], [33, 145, 140], [94, 201, 98], [253, 231, 37]];
function viridis(t) {
  t = Math.min(1, Math.max(0, t)) * (VIRIDIS.length - 1);
  const i = Math.min(VIRIDIS.length - 2, Math.floor(t)), f = t - i;
  const c = VIRIDIS[i].map((a, k) => Math.round(a + f * (VIRIDIS[i + 1][k] - a)));
  return `rgb(${c[0]},${c[1]},${c[2]})`;
}

function blues(t) {  // white -> dark blue, for attention weights
  t = Math.min(1, Math.max(0, t));
  return `rgb(${Math.round(255 - 247 * t)},${Math.round(255 - 207 * t)},${Math.round(255 - 148 * t)})`;
}

const tooltip = document.getElementById("tooltip");
function showTip(ev, html, dataset = {}) {
  tooltip.innerHTML = html;
  for (const k of Object.keys(tooltip.dataset)) delete tooltip.dataset[k];
  Object.assign(tooltip.dataset, dataset);
  tooltip.hidden = false;
  tooltip.style.left = `${ev.pageX + 14}px`;
  tooltip.style.top = `${ev.pageY + 14}px`;
}
function hideTip() { tooltip.hidden = true; }

function escapeHtml(s) {
  return String(s).replace(/[&<>"]/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;" })[c]);
}

// ---------- data access ----------

const tri = (i) => (i * (i + 1)) / 2;
function headIndex() { return state.layer * DATA.H + state.head; }
function record(option = state.option, layer = state.layer, head = state.head) {
  return DATA.heads[option][layer * DATA.H + head];
}
function pairOf() { return DATA.pair_index[headIndex()]; }

/** Row i (keys 0..i) of slab k of a quantised array: q / 255 * the row's scale; and the quantisation step. */
function dequantised(name, k, i) {
  const T = DATA.T, base = k * DATA.B + state.seq, o = base * tri(T) + tri(i);
  const scale = arrays[`${name}_scale`][base * T + i], q = arrays[name].subarray(o, o + i + 1);
  return { row: Float32Array.from(q, (v) => (v / 255) * scale), step: scale / 255 };
}

/** The expected and actual rows of query i (keys 0..i) of the current head and sequence. */
function rows(i) {
  const e = dequantised("expected", pairOf(), i), a = dequantised("actual", DATA.actual_slot[state.option][headIndex()], i);
  return { expected: e.row, actual: a.row, steps: { expected: e.step, actual: a.step } };
}

/** A probability to the digits its quantisation step supports (at least 2 decimals, at most 6). */
function prob(v, step) {
  const digits = Math.max(2, Math.min(6, Math.ceil(-Math.log10(step || 1e-6))));
  return v.toFixed(digits);
}

/** "valid", "short" (no full n-gram: i < n-1) or "dropped" (n-gram unobserved / no expected mass). */
function queryStatus(i) {
  const T = DATA.T;
  if (arrays.valid[(pairOf() * DATA.B + state.seq) * T + i]) return "valid";
  return i < record().n - 1 ? "short" : "dropped";
}
const STATUS_TEXT = { short: "no full n-gram (i < n-1)", dropped: "dropped: n-gram unobserved in the counts" };

function queryMetrics(i) {
  const slot = DATA.query_slot[state.option][headIndex()], M = DATA.query_metrics.length;
  const o = ((slot * DATA.B + state.seq) * DATA.T + i) * M;
  return arrays.query.subarray(o, o + M);
}

// ---------- tabs ----------

function setupTabs() {
  const nav = document.getElementById("tabs");
  const wanted = DATA.options.length ? ["overview", "head", "tokens"] : [];
  if (DATA.scores) wanted.push("scores");
  wanted.push("provenance");
  for (const sec of document.querySelectorAll("section.tab")) {
    const name = sec.id.replace("tab-", "");
    if (!wanted.includes(name)) { sec.remove(); continue; }
    nav.append(el("button", { role: "tab", "data-tab": name, text: sec.dataset.title, onclick: () => showTab(name) }));
  }
  showTab(wanted[0]);
}

function showTab(name) {
  for (const sec of document.querySelectorAll("section.tab")) sec.hidden = sec.id !== `tab-${name}`;
  for (const b of document.querySelectorAll("#tabs button")) b.setAttribute("aria-selected", b.dataset.tab === name);
  document.body.dataset.tab = name;
  if (name === "head") renderHead();
  if (name === "tokens") renderTokens();
}

// ---------- overview ----------

function renderOptionSwitch() {
  const box = document.getElementById("option-switch");
  box.replaceChildren();
  if (DATA.options.length < 2) return;
  box.append(el("span", { text: "option: " }));
  for (const opt of DATA.options) {
    box.append(el("button", {
      "data-option": opt, "aria-pressed": opt === state.option, text: opt,
      onclick: () => { state.option = opt; renderOverview(); },
    }));
  }
}

function renderOverview() {
  renderOptionSwitch();
  const box = document.getElementById("grids");
  box.replaceChildren();
  const repeated = new Set(DATA.repeated.map(([l, h]) => `${l},${h}`));
  for (const m of DATA.metrics) {
    const [lo, hi] = DATA.ranges[m];
    const grid = el("div", { class: "grid", style: `grid-template-columns: 2.2em repeat(${DATA.H}, 1fr)` });
    grid.append(el("div"));
    for (let h = 0; h < DATA.H; h++) grid.append(el("div", { class: "axis", text: `h${h}` }));
    for (let l = 0; l < DATA.L; l++) {
      grid.append(el("div", { class: "axis", text: `L${l}` }));
      for (let h = 0; h < DATA.H; h++) {
        const r = record(state.option, l, h), text = r.v[m];
        const value = parseFloat(text);
        const cell = el("div", {
          class: "cell" + (repeated.has(`${l},${h}`) ? " shared" : "") + (isNaN(value) ? " na" : ""),
          "data-layer": l, "data-head": h, "data-metric": m, "data-value": text,
          onclick: () => openHead(l, h),
          onmousemove: (ev) => showTip(ev, `<b>L${l} H${h}</b> (n=${r.n}, s=${r.s})<br>${DATA.labels[m]}: <b>${text}</b>`
            + `<br>${r.num_queries} queries, ${r.num_dropped} dropped`),
          onmouseleave: hideTip,
        });
        if (!isNaN(value)) cell.style.background = viridis((value - lo) / (hi - lo || 1));
        grid.append(cell);
      }
    }
    const legend = el("div", { class: "legend" },
      el("span", { text: lo.toFixed(2) }), el("span", { class: "bar" }), el("span", { text: hi.toFixed(2) }));
    box.append(el("figure", { class: "metric", "data-metric": m },
      el("figcaption", {}, el("b", { text: DATA.labels[m] }), el("span", { class: "hint", text: DATA.better[m] })),
      grid, legend));
  }
}

function openHead(layer, head) {
  Object.assign(state, { layer, head, query: null });
  showTab("head");
}

// ---------- head view ----------

function select(label, values, current, onchange, names = values) {
  const s = el("select", { "data-control": label, onchange: (ev) => onchange(ev.target.value) });
  values.forEach((v, k) => s.append(el("option", { value: v, text: names[k] })));
  s.value = String(current);
  return el("label", {}, `${label} `, s);
}

function renderControls(boxId) {
  const box = document.getElementById(boxId);
  const range = (n) => [...Array(n).keys()];
  const rerender = () => { renderHead(); renderTokens(); };
  box.replaceChildren(
    select("option", DATA.options, state.option, (v) => { state.option = v; rerender(); }),
    select("layer", range(DATA.L), state.layer, (v) => { state.layer = +v; rerender(); }),
    select("head", range(DATA.H), state.head, (v) => { state.head = +v; rerender(); }),
    select("sequence", range(DATA.B), state.seq, (v) => { state.seq = +v; state.query = null; rerender(); }),
    select("shading", ["row", "absolute"], state.scale, (v) => { state.scale = v; rerender(); },
      ["scaled to each row's max", "absolute probability"]),
  );
}

function metricSpan(m, text) { return `<span class="metric" data-metric="${m}">${escapeHtml(text)}</span>`; }

function renderHead() {
  if (!DATA.options.length) return;
  renderControls("head-controls");
  const r = record();
  const parts = DATA.metrics.map((m) => `${DATA.labels[m]} ${metricSpan(m, r.v[m])}`);
  document.getElementById("head-summary").innerHTML =
    `<b>${escapeHtml(state.option)} L${state.layer} H${state.head}</b>, (n, s) = (${r.n}, ${r.s}). ` +
    `Over all ${DATA.B_total} sequences (as metrics.json): ${parts.join(" · ")} · ` +
    `<span data-metric="num_queries">${r.num_queries}</span> queries, ${r.num_dropped} dropped.`;
  const note = state.scale === "row" ? "each row scaled to its max" : "absolute probability (0 to 1)";
  for (const span of document.querySelectorAll(".scale-note")) span.textContent = note;
  drawMap("map-expected", "expected");
  drawMap("map-actual", "actual");
  renderQueryTable();
}

const MAP = { cell: 8, left: 64, top: 52 };

function drawMap(canvasId, which) {
  const T = DATA.T, toks = DATA.tokens[state.seq];
  const c = MAP.cell = Math.max(5, Math.min(14, Math.floor(560 / T)));
  const canvas = document.getElementById(canvasId);
  Object.assign(canvas.dataset, { cell: c, left: MAP.left, top: MAP.top });
  const ratio = window.devicePixelRatio || 1;
  const w = MAP.left + T * c + 4, h = MAP.top + T * c + 4;
  canvas.width = w * ratio; canvas.height = h * ratio;
  canvas.style.width = `${w}px`; canvas.style.height = `${h}px`;
  const ctx = canvas.getContext("2d");
  ctx.setTransform(ratio, 0, 0, ratio, 0, 0);
  ctx.fillStyle = "#fff"; ctx.fillRect(0, 0, w, h);
  ctx.font = `${c - 1}px monospace`; ctx.fillStyle = "#333"; ctx.textBaseline = "middle";
  for (let i = 0; i < T; i++) {
    const label = shown(toks[i]).slice(0, 6);
    ctx.textAlign = "right";
    ctx.fillText(`${label} ${i}`, MAP.left - 3, MAP.top + i * c + c / 2);
    ctx.save(); ctx.translate(MAP.left + i * c + c / 2, MAP.top - 3); ctx.rotate(-Math.PI / 2);
    ctx.textAlign = "left"; ctx.fillText(`${label} ${i}`, 0, 0); ctx.restore();
  }
  for (let i = 0; i < T; i++) {
    const y = MAP.top + i * c, status = queryStatus(i);
    if (status !== "valid") { hatch(ctx, MAP.left, y, (i + 1) * c, c); continue; }
    const row = rows(i)[which];
    const top = state.scale === "row" ? Math.max(...row) || 1 : 1;
    for (let j = 0; j <= i; j++) {
      ctx.fillStyle = blues(row[j] / top);
      ctx.fillRect(MAP.left + j * c, y, c, c);
    }
  }
  ctx.strokeStyle = "#999"; ctx.strokeRect(MAP.left - 0.5, MAP.top - 0.5, T * c + 1, T * c + 1);
  canvas.onmousemove = (ev) => hoverMap(ev, canvas);
  canvas.onmouseleave = hideTip;
  canvas.onclick = (ev) => {
    const hit = mapCell(ev, canvas);
    if (hit) { state.query = hit.i; showTab("tokens"); }
  };
}

function hatch(ctx, x, y, w, h) {
  ctx.fillStyle = "#eee"; ctx.fillRect(x, y, w, h);
  ctx.strokeStyle = "#bbb"; ctx.beginPath();
  for (let k = -h; k < w; k += 4) { ctx.moveTo(x + k, y + h); ctx.lineTo(x + k + h, y); }
  ctx.save(); ctx.rect(x, y, w, h); ctx.clip(); ctx.stroke(); ctx.restore();
}

function mapCell(ev, canvas) {
  const box = canvas.getBoundingClientRect();
  const j = Math.floor((ev.clientX - box.left - MAP.left) / MAP.cell);
  const i = Math.floor((ev.clientY - box.top - MAP.top) / MAP.cell);
  return i >= 0 && i < DATA.T && j >= 0 && j <= i ? { i, j } : null;
}

function hoverMap(ev, canvas) {
  const hit = mapCell(ev, canvas);
  if (!hit) { hideTip(); return; }
  const { i, j } = hit, toks = DATA.tokens[state.seq], status = queryStatus(i);
  const head = `query i=${i} <code>${escapeHtml(shown(toks[i]))}</code> → key j=${j} <code>${escapeHtml(shown(toks[j]))}</code>`;
  if (status !== "valid") { showTip(ev, `${head}<br>${STATUS_TEXT[status]}`, { query: i, key: j, status }); return; }
  const { expected, actual, steps } = rows(i);
  showTip(ev, `${head}<br>expected <b>${prob(expected[j], steps.expected)}</b> · ` +
    `actual <b>${prob(actual[j], steps.actual)}</b>`,
    { query: i, key: j, status, expected: expected[j], actual: actual[j] });
}

function renderQueryTable() {
  const toks = DATA.tokens[state.seq], names = DATA.query_metrics;
  const head = el("tr", {}, el("th", { text: "i" }), el("th", { text: "query" }),
    ...names.map((m) => el("th", { text: DATA.labels[m] })));
  const body = [head];
  for (let i = 0; i < DATA.T; i++) {
    const status = queryStatus(i);
    const tr = el("tr", { class: status, "data-query": i }, el("td", { text: i }), el("td", {}, el("code", { text: shown(toks[i]) })));
    if (status === "valid") {
      const q = queryMetrics(i);
      names.forEach((m, k) => tr.append(el("td", { text: q[k].toFixed(3) })));
    } else {
      tr.append(el("td", { colspan: names.length, text: STATUS_TEXT[status] }));
    }
    body.push(tr);
  }
  document.getElementById("query-table").replaceChildren(el("table", { class: "data" }, ...body));
}

// ---------- token view ----------

function renderTokens() {
  if (!DATA.options.length) return;
  renderControls("token-controls");
  const T = DATA.T, toks = DATA.tokens[state.seq];
  if (state.query === null) state.query = firstValidQuery();
  const q = state.query, status = queryStatus(q), r = status === "valid" ? rows(q) : null;
  hideTip();
  const peak = (which) => {
    const row = r[which], j = row.indexOf(Math.max(...row));
    return `${prob(row[j], r.steps[which])} at j=${j}`;
  };
  document.getElementById("token-status").innerHTML =
    `${escapeHtml(state.option)} L${state.layer} H${state.head}, sequence ${state.seq}: query i=${q} ` +
    `<code>${escapeHtml(shown(toks[q]))}</code>` + (r ? `; largest weight: expected ${peak("expected")}, ` +
    `actual ${peak("actual")} (uniform would be ${(1 / (q + 1)).toPrecision(3)})` : ` (${STATUS_TEXT[status]}: no weights)`);
  for (const which of ["expected", "actual"]) {
    const row = r ? r[which] : null;
    const top = row ? (state.scale === "row" ? Math.max(...row) || 1 : 1) : 1;
    const spans = toks.map((tok, j) => {
      const w = row && j <= q ? row[j] : null;
      const span = el("span", {
        class: "tok" + (j === q ? " query" : "") + (j > q ? " future" : ""),
        "data-pos": j, "data-weight": w === null ? "" : w, text: tok === "\n" ? "\u23ce" : tok,
        onclick: () => { state.query = j; renderTokens(); },
        onmousemove: (ev) => showTip(ev, `key j=${j} <code>${escapeHtml(shown(tok))}</code>` +
          (w === null ? "" : `<br>${which} weight <b>${prob(w, r.steps[which])}</b>`)),
        onmouseleave: hideTip,
      });
      if (w !== null) {
        span.style.background = blues(w / top);
        if (w / top > 0.55) span.style.color = "#fff";
      }
      return span;
    });
    document.getElementById(`tokens-${which}`).replaceChildren(...spans);
  }
}

function firstValidQuery() {
  for (let i = DATA.T - 1; i >= 0; i--) if (queryStatus(i) === "valid") return i;
  return DATA.T - 1;
}

// ---------- provenance and scores ----------

/** A number for the provenance tables: 4 significant digits (metrics.json has every digit). */
function num(v) {
  if (Number.isInteger(v)) return String(v);
  return v !== 0 && Math.abs(v) < 1e-3 ? v.toExponential(2) : String(Number(v.toPrecision(4)));
}

function valueNode(v) {
  if (typeof v === "number") return document.createTextNode(num(v));
  if (Array.isArray(v) && v.every((x) => typeof x === "number")) {
    return el("span", { class: "list", text: `[${v.map(num).join(", ")}]` });
  }
  if (v !== null && typeof v === "object") return el("code", { class: "json", text: JSON.stringify(v) });
  return document.createTextNode(v === null ? "n/a" : String(v));
}

function tableOf(rowsList) {
  const cols = [...new Set(rowsList.flatMap((r) => Object.keys(r)))];
  return el("table", { class: "data" }, el("tr", {}, ...cols.map((c) => el("th", { text: c }))),
    ...rowsList.map((r) => el("tr", {}, ...cols.map((c) => {
      const v = r[c] ?? null;
      return el("td", typeof v === "number" ? { class: "num" } : {}, valueNode(v));
    }))));
}

function renderSections(sectionId, sections) {
  const box = document.getElementById(sectionId);
  if (!box) return;
  for (const s of sections) {
    box.append(el("h2", { text: s.title }));
    if (s.note) box.append(el("p", { class: "help", text: s.note }));
    if (s.kind === "table") box.append(tableOf(s.rows));
    else box.append(el("table", { class: "kv" },
      ...Object.entries(s.items).map(([k, v]) => el("tr", {}, el("th", { text: k }), el("td", {}, valueNode(v))))));
  }
}

function renderScores() {
  const box = document.getElementById("tab-scores"), S = DATA.scores;
  if (!box || !S) return;
  box.append(el("h2", { text: "Best (n, s) table of each head" }), el("p", { class: "help", text: S.note }));
  const grid = el("div", { class: "grid scores", style: `grid-template-columns: 2.6em repeat(${S.heads}, 1fr)` });
  grid.append(el("div"));
  for (let h = 0; h < S.heads; h++) grid.append(el("div", { class: "axis", text: `h${h}` }));
  for (let b = 0; b < S.blocks; b++) {
    grid.append(el("div", { class: "axis", text: `b${b}` }));
    for (let h = 0; h < S.heads; h++) {
      const e = S.cells[b * S.heads + h];
      const cell = el("div", { class: "cell", "data-block": b, "data-head": h, text: `${e.n},${e.s}`,
        onmousemove: (ev) => showTip(ev, `block ${b} head ${h}: best (n, s) = (${e.n}, ${e.s})<br>cosine ${e.cosine}` +
          ` · tied ${e.tied} · KL ${e.kl}`), onmouseleave: hideTip });
      cell.style.background = viridis(parseFloat(e.cosine));
      if (parseFloat(e.cosine) > 0.6) cell.style.color = "#000"; else cell.style.color = "#fff";
      grid.append(cell);
    }
  }
  box.append(grid);
  renderSections("tab-scores", S.sections || []);
}

// ---------- start ----------

async function main() {
  document.getElementById("subtitle").textContent = DATA.subtitle || "";
  if (DATA.options.length) {
    for (const [name, slab] of Object.entries(DATA.arrays)) arrays[name] = await decodeSlab(slab);
    state.option = DATA.default_option || DATA.options[0];
    [state.layer, state.head] = DATA.default_head || [0, 0];
    renderOverview();
  }
  renderScores();
  renderSections("tab-provenance", DATA.provenance);
  setupTabs();
  document.body.dataset.ready = "1";
}

main().catch((err) => {
  document.body.dataset.ready = "error";
  document.getElementById("subtitle").textContent = `report failed to load: ${err}`;
  throw err;
});
