"""The service's web page: pick or drop an image, see its score, the decision and the heatmap overlay.

One self-contained HTML document (no external scripts or fonts: inspection PCs are often offline)."""

from __future__ import annotations

__all__ = ["PAGE"]

PAGE = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>patchcore inspection</title>
<style>
  body { font-family: system-ui, sans-serif; margin: 2rem; color: #222; max-width: 60rem; }
  h1 { font-size: 1.4rem; margin-bottom: .2rem; }
  #drop { border: 2px dashed #888; border-radius: 8px; padding: 2rem; text-align: center; margin: 1rem 0;
          background: #fafafa; cursor: pointer; }
  #drop.over { background: #e8f0ff; border-color: #36c; }
  #result { display: none; margin-top: 1rem; }
  .row { display: flex; gap: 1.5rem; flex-wrap: wrap; align-items: flex-start; }
  .card { border: 1px solid #ddd; border-radius: 8px; padding: 1rem; min-width: 16rem; }
  .big { font-size: 2rem; font-weight: 600; }
  .ok { color: #17803d; } .bad { color: #c0262d; } .unknown { color: #8a6d00; }
  img { width: 24rem; max-width: 100%; image-rendering: pixelated; border-radius: 4px; border: 1px solid #ccc; }
  #error { color: #c0262d; margin-top: 1rem; }
  .muted { color: #666; font-size: .9rem; }
</style>
</head>
<body>
<h1>patchcore inspection</h1>
<div class="muted">Scores an image with the served model; the threshold comes from good parts only.</div>
<label>Model: <select id="model"></select></label>
<div id="drop">Drop an image here, or <input type="file" id="file" accept="image/*"></div>
<div id="status" class="muted"></div>
<div id="error"></div>
<div id="result">
  <div class="row">
    <div class="card">
      <div>Decision</div>
      <div id="decision" class="big"></div>
      <div>Score <span id="score"></span> (normalised <span id="normalized"></span>, threshold
        <span id="threshold"></span>)</div>
      <div class="muted" id="calibration"></div>
      <div class="muted">latency <span id="latency"></span> ms, model <span id="model-used"></span></div>
    </div>
    <img id="heatmap" alt="heatmap overlay">
  </div>
</div>
<script>
const $ = (id) => document.getElementById(id);
async function loadModels() {
  try {
    const r = await fetch("models");
    const body = await r.json();
    for (const m of body.models) {
      const o = document.createElement("option");
      o.value = m.name; o.textContent = m.name + " (" + m.backbone + ")";
      $("model").appendChild(o);
    }
  } catch (e) { $("error").textContent = "cannot list models: " + e; }
}
function fmt(x) { return x === null || x === undefined ? "n/a" : Number(x).toPrecision(5); }
async function send(file) {
  $("error").textContent = ""; $("status").textContent = "scoring " + file.name + " ...";
  const form = new FormData(); form.append("file", file);
  const model = $("model").value;
  const url = "predict?heatmap=true" + (model ? "&model=" + encodeURIComponent(model) : "");
  try {
    const r = await fetch(url, { method: "POST", body: form });
    const body = await r.json();
    if (!r.ok) { $("error").textContent = "error " + r.status + ": " + body.detail; $("status").textContent = ""; return; }
    const d = $("decision");
    if (body.anomalous === null) { d.textContent = "NOT CALIBRATED"; d.className = "big unknown"; }
    else if (body.anomalous) { d.textContent = "ANOMALOUS"; d.className = "big bad"; }
    else { d.textContent = "GOOD"; d.className = "big ok"; }
    $("score").textContent = fmt(body.score);
    $("normalized").textContent = fmt(body.normalized_score);
    $("threshold").textContent = fmt(body.threshold);
    $("calibration").textContent = body.calibration || "";
    $("latency").textContent = body.latency_ms;
    $("model-used").textContent = body.model;
    $("heatmap").src = "data:image/png;base64," + body.heatmap_png_base64;
    $("result").style.display = "block";
    $("status").textContent = file.name + " scored";
  } catch (e) { $("error").textContent = "request failed: " + e; $("status").textContent = ""; }
}
$("file").addEventListener("change", (e) => { if (e.target.files.length) send(e.target.files[0]); });
const drop = $("drop");
drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
drop.addEventListener("dragleave", () => drop.classList.remove("over"));
drop.addEventListener("drop", (e) => {
  e.preventDefault(); drop.classList.remove("over");
  if (e.dataTransfer.files.length) send(e.dataTransfer.files[0]);
});
loadModels();
</script>
</body>
</html>
"""
