"""The station's web page: log in with the key, drop or pick an image, see the decision and the heatmap,
give feedback ("good part" / "confirmed defect"), undo, browse the recent decisions and watch the drift.

One self-contained HTML document (no external scripts, fonts or images: inspection PCs are often offline).
The document is a shell: it holds no data and is served without the key. The key the operator types is kept
in ``sessionStorage`` (this tab only, gone when the tab closes), never in a URL or a log, and every call
sends it as ``Authorization: Bearer``.
"""

from __future__ import annotations

__all__ = ["PAGE"]

PAGE = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta name="referrer" content="no-referrer">
<title>patchcore station</title>
<style>
  body { font-family: system-ui, sans-serif; margin: 1.5rem; color: #222; max-width: 72rem; }
  h1 { font-size: 1.4rem; margin: 0 0 .2rem 0; }
  h2 { font-size: 1.05rem; margin: 1.2rem 0 .4rem 0; }
  header { display: flex; gap: 1rem; align-items: baseline; flex-wrap: wrap; }
  #drop { border: 2px dashed #888; border-radius: 8px; padding: 1.2rem; text-align: center; margin: .8rem 0;
          background: #fafafa; cursor: pointer; }
  #drop.over { background: #e8f0ff; border-color: #36c; }
  .row { display: flex; gap: 1.5rem; flex-wrap: wrap; align-items: flex-start; }
  .card { border: 1px solid #ddd; border-radius: 8px; padding: 1rem; min-width: 18rem; }
  .big { font-size: 2rem; font-weight: 600; }
  .ok { color: #17803d; } .bad { color: #c0262d; } .unknown { color: #8a6d00; }
  #heatmap { width: 22rem; max-width: 100%; image-rendering: pixelated; border-radius: 4px; border: 1px solid #ccc; }
  .error { color: #c0262d; margin: .5rem 0; font-weight: 600; }
  .muted { color: #666; font-size: .9rem; }
  button { font-size: 1rem; padding: .35rem .8rem; margin: .3rem .3rem 0 0; cursor: pointer; }
  table { border-collapse: collapse; width: 100%; font-size: .9rem; }
  td, th { border-bottom: 1px solid #eee; padding: .25rem .4rem; text-align: left; }
  tr.pick { cursor: pointer; } tr.pick:hover { background: #f3f6ff; } tr.current { background: #e8f0ff; }
  td img { width: 48px; height: 48px; object-fit: cover; border-radius: 3px; }
  #login-box { max-width: 26rem; margin-top: 2rem; }
  #login-box input { font-size: 1rem; padding: .35rem; width: 100%; box-sizing: border-box; }
  .hidden { display: none !important; }
  #drift svg { background: #fcfcfc; border: 1px solid #ddd; border-radius: 4px; }
  .alarm { color: #fff; background: #c0262d; padding: 0 .4rem; border-radius: 3px; }
</style>
</head>
<body>
<header>
  <h1>patchcore station</h1>
  <span class="muted" id="whoami"></span>
  <button id="logout" class="hidden" type="button">Log out</button>
</header>

<form id="login-box" class="hidden" autocomplete="off">
  <p>This station needs its key.</p>
  <label>Key <input type="password" id="key" autocomplete="off" spellcheck="false"></label>
  <button id="login" type="submit">Log in</button>
  <div id="login-error" class="error" role="alert"></div>
  <div class="muted">The key stays in this browser tab only (cleared when it closes or on "Log out").</div>
</form>

<main id="station" class="hidden">
  <div class="row">
    <label>Model <select id="model"></select></label>
    <span class="station-only">version <b id="version">?</b></span>
    <button id="undo" type="button" class="operator">Undo last update</button>
  </div>
  <div id="drop">Drop an image here, or <input type="file" id="file" accept="image/*"></div>
  <div id="status" class="muted"></div>
  <div id="error" class="error" role="alert"></div>

  <div id="result" class="hidden">
    <div class="row">
      <div class="card">
        <div>Decision <span class="muted" id="result-image"></span></div>
        <div id="decision" class="big"></div>
        <div>Score <span id="score"></span> (threshold <span id="threshold"></span>)</div>
        <div class="muted">model version <span id="model-version"></span>, <span id="result-time"></span></div>
        <div id="rescored" class="muted"></div>
        <div id="feedback-state"></div>
        <div class="operator">
          <button id="good" type="button">Good part (false alarm)</button>
          <button id="defect" type="button">Confirmed defect</button>
        </div>
      </div>
      <img id="heatmap" alt="heatmap overlay">
    </div>
  </div>

  <div class="row station-only">
    <div style="flex: 2; min-width: 26rem">
      <h2>Recent decisions</h2>
      <label><input type="checkbox" id="only-anomalous"> anomalous only</label>
      <table><thead><tr><th></th><th>time</th><th>image</th><th>score</th><th>decision</th><th>version</th>
        <th>feedback</th></tr></thead><tbody id="recent"></tbody></table>
    </div>
    <div style="flex: 1; min-width: 22rem" id="drift">
      <h2>Drift</h2>
      <svg id="drift-plot" width="360" height="140" role="img" aria-label="scores of recent decisions"></svg>
      <svg id="drift-rate" width="360" height="46" role="img" aria-label="false-alarm rate"></svg>
      <div id="drift-text" class="muted"></div>
    </div>
  </div>
</main>

<script>
"use strict";
const $ = (id) => document.getElementById(id);
const KEY = "patchcore-station-key";
let role = "operator", current = null, timer = null, basic = false;

function key() { return sessionStorage.getItem(KEY); }
function fmt(x) { return x === null || x === undefined ? "n/a" : Number(x).toPrecision(5); }
function pct(x) { return x === null || x === undefined ? "n/a" : (100 * x).toFixed(1) + "%"; }
function when(t) { return new Date(t * 1000).toLocaleTimeString(); }
function model() { return $("model").value; }

class AuthError extends Error {}

async function call(path, options = {}) {
  const headers = Object.assign({}, options.headers || {});
  const k = key();
  if (k) headers["Authorization"] = "Bearer " + k;
  const r = await fetch(path, Object.assign({}, options, { headers, cache: "no-store" }));
  if (r.status === 401) throw new AuthError("wrong key");
  let body = null;
  try { body = await r.json(); } catch (e) { body = { detail: "HTTP " + r.status }; }
  return { ok: r.ok, status: r.status, body };
}

function showLogin(message) {
  if (timer) { clearInterval(timer); timer = null; }
  $("station").classList.add("hidden");
  $("logout").classList.add("hidden");
  $("login-box").classList.remove("hidden");
  $("login-error").textContent = message || "";
  $("whoami").textContent = "";
  $("recent").replaceChildren(); $("model").replaceChildren(); $("result").classList.add("hidden");
  $("key").value = ""; $("key").focus();
}

async function enter() {
  let s;
  try { s = await call("station"); }
  catch (e) {
    if (e instanceof AuthError) {
      const had = key() !== null;
      sessionStorage.removeItem(KEY);
      showLogin(had ? "Wrong key: the station refused it. Check the key and try again." : "");
      return;
    }
    showLogin("Cannot reach the station: " + e); return;
  }
  if (s.status === 404) { await enterBasic(); return; }
  if (s.status === 503) { $("login-error").textContent = "The models are still loading ..."; setTimeout(enter, 2000); return; }
  if (!s.ok) { showLogin("The station answered " + s.status + ": " + s.body.detail); return; }
  basic = false;
  role = s.body.role;
  $("login-box").classList.add("hidden");
  $("station").classList.remove("hidden");
  $("logout").classList.toggle("hidden", key() === null);
  $("whoami").textContent = key() === null ? "(no key needed)" : "logged in as " + role;
  for (const el of document.querySelectorAll(".operator")) el.classList.toggle("hidden", role !== "operator");
  const select = $("model");
  select.replaceChildren();
  for (const m of s.body.models) {
    const o = document.createElement("option");
    o.value = m.name; o.textContent = m.name; select.appendChild(o);
  }
  showVersion(s.body);
  await refresh();
  timer = setInterval(() => refresh().catch((e) => {
    if (e instanceof AuthError) { sessionStorage.removeItem(KEY); showLogin("Wrong key: the station refused it."); }
  }), 5000);
}

async function enterBasic() {
  // A service without the station (no recent list, feedback or drift): score and look only.
  basic = true;
  const r = await call("models");
  $("login-box").classList.add("hidden");
  $("station").classList.remove("hidden");
  $("logout").classList.toggle("hidden", key() === null);
  for (const el of document.querySelectorAll(".operator, .station-only")) el.classList.add("hidden");
  const select = $("model");
  select.replaceChildren();
  for (const m of (r.ok ? r.body.models : [])) {
    const o = document.createElement("option");
    o.value = m.name; o.textContent = m.name + " (" + m.backbone + ")"; select.appendChild(o);
  }
}

function showVersion(overview) {
  const m = overview.models.find((x) => x.name === model());
  $("version").textContent = m ? m.version : "?";
  $("undo").disabled = !(m && m.learns && m.updates > 0);
}

async function guarded(work) {
  $("error").textContent = "";
  try { await work(); }
  catch (e) {
    if (e instanceof AuthError) { sessionStorage.removeItem(KEY); showLogin("Wrong key: the station refused it."); }
    else { $("error").textContent = "request failed: " + e; }
  }
}

async function refresh() {
  const s = await call("station");
  if (s.ok) { role = s.body.role; showVersion(s.body); }
  const only = $("only-anomalous").checked ? "&anomalous=true" : "";
  const r = await call("decisions?limit=50" + only);
  if (r.ok) showRecent(r.body.decisions);
  const d = await call("drift?model=" + encodeURIComponent(model()));
  if (d.ok) showDrift(d.body);
}

function decisionText(d) {
  if (d.anomalous === null) return ["NOT CALIBRATED", "unknown"];
  return d.anomalous ? ["ANOMALOUS", "bad"] : ["GOOD", "ok"];
}

function showRecent(list) {
  const body = $("recent");
  body.replaceChildren();
  for (const d of list) {
    const tr = document.createElement("tr");
    tr.className = "pick" + (current && current.id === d.id ? " current" : "");
    tr.dataset.id = d.id;
    const cells = [];
    const img = document.createElement("img");
    if (d.thumbnail_png_base64) img.src = "data:image/png;base64," + d.thumbnail_png_base64;
    img.alt = d.image;
    cells.push(img);
    const [text, cls] = decisionText(d);
    for (const v of [when(d.time), d.image, fmt(d.score), text, "v" + d.model_version, d.feedback || ""]) {
      cells.push(document.createTextNode(v));
    }
    for (const [i, c] of cells.entries()) {
      const td = document.createElement("td");
      if (i === 4) td.className = cls;
      td.appendChild(c); tr.appendChild(td);
    }
    tr.addEventListener("click", () => guarded(async () => {
      const r = await call("decisions/" + encodeURIComponent(d.id));
      if (r.ok) show(r.body); else $("error").textContent = r.body.detail;
    }));
    body.appendChild(tr);
  }
}

function show(d) {
  current = d;
  const [text, cls] = decisionText(d);
  $("decision").textContent = text; $("decision").className = "big " + cls;
  $("result-image").textContent = d.image;
  $("score").textContent = fmt(d.score);
  $("threshold").textContent = fmt(d.threshold);
  $("model-version").textContent = d.model_version === undefined ? "n/a" : d.model_version;
  $("result-time").textContent = d.time === undefined ? "" : when(d.time);
  if (d.heatmap_png_base64) $("heatmap").src = "data:image/png;base64," + d.heatmap_png_base64;
  $("rescored").textContent = d.rescored_score === null || d.rescored_score === undefined ? "" :
    "now scores " + fmt(d.rescored_score) + " with version " + d.rescored_version +
    (d.rescored_anomalous === null ? "" : (d.rescored_anomalous ? " (anomalous)" : " (good)"));
  $("feedback-state").textContent = d.feedback === "good" ?
    "operator: good part" + (d.feedback_version !== null ? ", added as version " + d.feedback_version : "") +
    (d.forced ? " (forced past the guard)" : "") : d.feedback === "defect" ? "operator: confirmed defect" : "";
  $("good").disabled = d.feedback === "good" || !d.image_held;
  $("defect").disabled = d.feedback === "defect";
  $("result").classList.remove("hidden");
  for (const tr of $("recent").children) tr.classList.toggle("current", tr.dataset.id === d.id);
}

async function send(file) {
  await guarded(async () => {
    $("status").textContent = "scoring " + file.name + " ...";
    const form = new FormData(); form.append("file", file);
    const path = basic ? "predict?heatmap=true&model=" : "inspect?model=";
    const r = await call(path + encodeURIComponent(model()), { method: "POST", body: form });
    if (!r.ok) { $("error").textContent = "error " + r.status + ": " + r.body.detail; $("status").textContent = ""; return; }
    show(r.body);
    $("status").textContent = file.name + " scored";
    if (!basic) await refresh();
  });
}

async function feedback(label, force) {
  if (!current) return;
  await guarded(async () => {
    $("status").textContent = label === "good" ? "adding " + current.image + " to the model ..." : "recording ...";
    const r = await call("feedback", {
      method: "POST", headers: { "Content-Type": "application/json" },
      body: JSON.stringify({ decision: current.id, label, force: !!force }),
    });
    if (r.status === 409 && r.body.refused) {
      $("status").textContent = "";
      const ok = window.confirm("The model refused to learn this image: " + r.body.detail +
        "\\n\\nIt may be a defect. Add it as a good part anyway?");
      if (ok) await feedback(label, true); else $("status").textContent = "not added";
      return;
    }
    if (!r.ok) { $("error").textContent = "error " + r.status + ": " + r.body.detail; $("status").textContent = ""; return; }
    if (r.body.decision) show(r.body.decision);
    $("status").textContent = label === "good" ?
      "added: the model is now version " + r.body.version : "recorded as a confirmed defect";
    await refresh();
  });
}

async function undo() {
  await guarded(async () => {
    const r = await call("undo?model=" + encodeURIComponent(model()), { method: "POST" });
    if (!r.ok) { $("error").textContent = "error " + r.status + ": " + r.body.detail; return; }
    if (r.body.decision && current && r.body.decision.id === current.id) show(r.body.decision);
    $("status").textContent = "undone: the model is now version " + r.body.version;
    await refresh();
  });
}

const SVG = "http://www.w3.org/2000/svg";
function el(name, attrs, text) {
  const e = document.createElementNS(SVG, name);
  for (const [k, v] of Object.entries(attrs)) e.setAttribute(k, v);
  if (text !== undefined) e.textContent = text;
  return e;
}

function showDrift(d) {
  const plot = $("drift-plot"), W = 360, H = 140, P = 6;
  plot.replaceChildren();
  const pts = d.points;
  const ys = pts.map((p) => p.score).concat(d.threshold === null ? [] : [d.threshold]);
  const lo = ys.length ? Math.min(...ys) : 0, hi = ys.length ? Math.max(...ys) : 1;
  const y = (v) => H - P - (H - 2 * P) * (hi > lo ? (v - lo) / (hi - lo) : 0.5);
  const x = (i) => P + (W - 2 * P) * (pts.length > 1 ? i / (pts.length - 1) : 0.5);
  if (d.threshold !== null) {
    plot.appendChild(el("line", { x1: P, x2: W - P, y1: y(d.threshold), y2: y(d.threshold),
      stroke: "#c0262d", "stroke-dasharray": "4 3" }));
    const ty = y(d.threshold) < 14 ? y(d.threshold) + 11 : y(d.threshold) - 3;
    plot.appendChild(el("text", { x: W - P, y: ty, "text-anchor": "end", "font-size": 10,
      fill: "#c0262d" }, "threshold"));
  }
  pts.forEach((p, i) => {
    const color = p.anomalous === null ? "#8a6d00" : p.anomalous ? "#c0262d" : "#17803d";
    plot.appendChild(el("circle", { cx: x(i), cy: y(p.score), r: 3, fill: color }));
    if (p.feedback) plot.appendChild(el("circle", { cx: x(i), cy: y(p.score), r: 6, fill: "none",
      stroke: p.feedback === "good" ? "#36c" : "#000" }));
  });
  const rate = $("drift-rate"), R = 360;
  rate.replaceChildren();
  const top = Math.min(1, Math.max(0.05, ...(d.calibrated_ci95 || [0]), ...(d.false_alarm_rate_ci95 || [0])) * 1.1);
  const rx = (v) => P + (R - 2 * P) * Math.min(v / top, 1);
  if (d.calibrated_ci95) {
    rate.appendChild(el("rect", { x: rx(d.calibrated_ci95[0]), y: 4, height: 22, fill: "#dde8dd",
      width: Math.max(1, rx(d.calibrated_ci95[1]) - rx(d.calibrated_ci95[0])) }));
  }
  if (d.false_alarm_rate_ci95) {
    rate.appendChild(el("line", { x1: rx(d.false_alarm_rate_ci95[0]), x2: rx(d.false_alarm_rate_ci95[1]),
      y1: 15, y2: 15, stroke: d.drift_alarm ? "#c0262d" : "#333", "stroke-width": 2 }));
    rate.appendChild(el("circle", { cx: rx(d.false_alarm_rate), cy: 15, r: 4, fill: d.drift_alarm ? "#c0262d" : "#333" }));
  }
  rate.appendChild(el("text", { x: P, y: 42, "font-size": 10, fill: "#666" }, "0"));
  rate.appendChild(el("text", { x: R - P, y: 42, "font-size": 10, fill: "#666", "text-anchor": "end" }, pct(top)));
  const q = d.good_score_quantiles;
  const text = $("drift-text");
  text.replaceChildren();
  const line = "last " + d.images + " images: " + pct(d.anomalous_rate) + " anomalous; goods' false-alarm rate " +
    pct(d.false_alarm_rate) + (d.false_alarm_rate_ci95 ? " [" + pct(d.false_alarm_rate_ci95[0]) + ", " +
    pct(d.false_alarm_rate_ci95[1]) + "]" : "") + " over " + d.goods + " goods, calibrated " +
    (d.calibrated_ci95 ? "[" + pct(d.calibrated_ci95[0]) + ", " + pct(d.calibrated_ci95[1]) + "]" : "n/a") +
    (q.p50 !== undefined ? "; good scores p50 " + fmt(q.p50) + ", p90 " + fmt(q.p90) : "") + ". ";
  text.appendChild(document.createTextNode(line));
  const flag = document.createElement("span");
  flag.id = "drift-flag";
  flag.textContent = d.drift_alarm ? "DRIFT: more false alarms than calibrated" : "within calibration";
  if (d.drift_alarm) flag.className = "alarm";
  text.appendChild(flag);
}

$("login-box").addEventListener("submit", (e) => {
  e.preventDefault();
  const k = $("key").value.trim();
  $("key").value = "";
  if (!k) { $("login-error").textContent = "Enter the key."; return; }
  sessionStorage.setItem(KEY, k);
  $("login-error").textContent = "checking ...";
  enter();
});
$("logout").addEventListener("click", () => { sessionStorage.removeItem(KEY); current = null; showLogin("Logged out."); });
$("file").addEventListener("change", (e) => { if (e.target.files.length) send(e.target.files[0]); e.target.value = ""; });
$("good").addEventListener("click", () => feedback("good", false));
$("defect").addEventListener("click", () => feedback("defect", false));
$("undo").addEventListener("click", () => undo());
$("only-anomalous").addEventListener("change", () => guarded(refresh));
$("model").addEventListener("change", () => { if (!basic) guarded(refresh); });
const drop = $("drop");
drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
drop.addEventListener("dragleave", () => drop.classList.remove("over"));
drop.addEventListener("drop", (e) => {
  e.preventDefault(); drop.classList.remove("over");
  if (e.dataTransfer.files.length) send(e.dataTransfer.files[0]);
});
enter();
</script>
</body>
</html>
"""
