// camlens serve: the page. Plain JavaScript, no libraries, talks only to this server.
"use strict";

const $ = (sel, root = document) => root.querySelector(sel);
const SVG = "http://www.w3.org/2000/svg";
const state = { info: null, image: null, result: null, thresholds: [] };

function el(tag, attrs = {}, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === "class") e.className = v;
    else if (k === "text") e.textContent = v;
    else if (k.startsWith("on")) e.addEventListener(k.slice(2), v);
    else if (v !== null && v !== undefined && v !== false) e.setAttribute(k, v === true ? "" : v);
  }
  for (const c of children) if (c) e.append(c);
  return e;
}

function svg(tag, attrs = {}) {
  const e = document.createElementNS(SVG, tag);
  for (const [k, v] of Object.entries(attrs)) e.setAttribute(k, v);
  return e;
}

function showError(message, status) {
  const m = $("#message");
  m.textContent = message;
  m.dataset.status = status || "";
  m.hidden = false;
  setStatus("error", status ? `error ${status}` : "error");
}

function clearError() {
  const m = $("#message");
  m.hidden = true;
  m.textContent = "";
  m.dataset.status = "";
}

function setStatus(s, text) {
  const st = $("#status");
  st.dataset.state = s;
  st.textContent = text;
}

async function api(path, options = {}) {
  const r = await fetch(path, options);
  let body = null;
  const type = r.headers.get("content-type") || "";
  if (type.includes("application/json")) body = await r.json();
  if (!r.ok) {
    const msg = body && body.error ? body.error : `the server answered ${r.status}`;
    const err = new Error(msg);
    err.status = r.status;
    throw err;
  }
  return body;
}

function fmtPct(p) { return (100 * p).toFixed(1) + "%"; }
function fmtMs(ms) { return ms === null || ms === undefined ? "cached" : ms < 10 ? ms.toFixed(1) + " ms" : Math.round(ms) + " ms"; }

// ---------------------------------------------------------------------------------------- setup
async function init() {
  try {
    state.info = await api("api/info");
  } catch (e) {
    showError("cannot reach the camlens server: " + e.message);
    return;
  }
  const info = state.info;
  state.thresholds = info.thresholds;
  $("#server-info").textContent = `camlens ${info.version}`;
  const sel = $("#model");
  for (const m of info.models) sel.append(el("option", { value: m.name, text: m.name, selected: m.name === info.default_model }));
  sel.addEventListener("change", updateMethodsForModel);
  const box = $("#methods");
  for (const kind of ["layer", "pixel"]) {
    box.append(el("div", { class: "kind", text: kind === "layer" ? "layer (CAM family)" : "pixel" }));
    for (const m of info.methods.filter((x) => x.kind === kind)) {
      const cb = el("input", { type: "checkbox", id: "method-" + m.name, value: m.name, checked: m.name === "gradcam" });
      box.append(el("label", { title: `${m.paper}: ${m.summary}`, "data-method": m.name }, cb, " " + m.title,
        m.slow ? el("span", { class: "slow", text: " slow" }) : null));
    }
  }
  const cm = $("#cmap");
  for (const c of info.colormaps) cm.append(el("option", { value: c, text: c }));
  const samples = $("#samples");
  for (const s of info.samples) {
    samples.append(el("button", { type: "button", "data-sample": s, title: s, onclick: () => pickSample(s) },
      el("img", { src: `api/image/sample-${s}.png?max_side=96`, alt: s })));
  }
  wireUpload();
  $("#explain-btn").addEventListener("click", () => runExplain(null));
  $("#opacity").addEventListener("input", updateOpacity);
  $("#threshold").addEventListener("input", updateBoxes);
  $("#show-box").addEventListener("change", updateBoxes);
  $("#box-pixel").addEventListener("change", updateBoxes);
  $("#cmap").addEventListener("change", updateHeat);
  updateOpacity();
  updateBoxes();
  updateMethodsForModel();
}

// offer only the methods that apply to the chosen model (the server's registry check, no forward pass)
async function updateMethodsForModel() {
  const model = $("#model").value;
  const note = $("#method-note");
  note.textContent = `checking which methods apply to ${model}…`;
  try {
    const r = await api(`api/methods?model=${encodeURIComponent(model)}`);
    if ($("#model").value !== model) return;  // the choice changed meanwhile
    $("#prompt-row").hidden = !r.image_text;  // CLIP-style models: texts typed here are the classes
    for (const label of document.querySelectorAll("#methods label[data-method]")) {
      const ok = r.methods.includes(label.dataset.method);
      const cb = $("input", label);
      label.hidden = !ok;
      cb.disabled = !ok;
      if (!ok) cb.checked = false;
    }
    const why = {};  // reason -> the methods it rules out
    for (const [name, reason] of Object.entries(r.not_applicable)) (why[reason] = why[reason] || []).push(name);
    const off = Object.entries(why).map(([reason, names]) => `${names.join(", ")} (for ${reason})`);
    const n = Object.keys(r.not_applicable).length;
    note.textContent = n ? `${n} method${n > 1 ? "s" : ""} not for this model (hover)` : "";
    note.title = `${r.describe}` + (off.length ? `; not offered: ${off.join("; ")}` : "");
    note.dataset.describe = r.describe;
    state.detector = r.describe.includes("detector");  // its detections are listed, one explained per click
  } catch (e) {
    note.textContent = "";
    showError(e.message, e.status);
  }
}

function wireUpload() {
  const input = $("#file-input");
  input.addEventListener("change", () => { if (input.files.length) upload(input.files[0]); input.value = ""; });
  const zone = $("#drop-zone");
  zone.addEventListener("keydown", (e) => { if (e.key === "Enter" || e.key === " ") { e.preventDefault(); input.click(); } });
  zone.addEventListener("dragover", (e) => { e.preventDefault(); zone.classList.add("over"); });
  zone.addEventListener("dragleave", () => zone.classList.remove("over"));
  zone.addEventListener("drop", (e) => {
    e.preventDefault();
    zone.classList.remove("over");
    if (e.dataTransfer.files.length) upload(e.dataTransfer.files[0]);
  });
}

// ---------------------------------------------------------------------------------------- image
const VOLUME_FILE = /\.(nii|nii\.gz|mp4|avi|webm|mkv|mov|m4v)$/i;
const VOLUME_METHODS = ["gradcam", "gradcam++", "saliency", "input_x_gradient"];

async function upload(file) {
  clearError();
  if (VOLUME_FILE.test(file.name)) return uploadVolume(file);
  setStatus("busy", `uploading ${file.name}…`);
  try {
    const info = await api("api/image", {
      method: "POST",
      body: file,
      headers: { "Content-Type": file.type || "application/octet-stream", "X-Filename": encodeURIComponent(file.name) },
    });
    setImage(info);
  } catch (e) {
    showError(e.message, e.status);
  }
}

async function pickSample(name) {
  clearError();
  try {
    setImage(await api(`api/sample/${name}`));
  } catch (e) {
    showError(e.message, e.status);
  }
}

function setImage(info) {
  state.image = info;
  state.result = null;
  $("#photo").src = info.url;
  $("#photo").dataset.imageId = info.id;
  $("#photo-caption").textContent = `${info.name} · ${info.width}×${info.height}`;
  const layer = $("#det-layer");
  if (layer) layer.replaceChildren();
  $("#photo-box").hidden = false;
  $("#predictions-box").hidden = true;
  $("#panels").replaceChildren();
  $("#downloads").hidden = true;
  $("#explain-btn").disabled = false;
  setStatus("ready", `${info.name} ready: choose methods and press Explain.`);
}

// ---------------------------------------------------------------------------------------- volumes
// a NIfTI scan or a video: explained by the chosen (3-D) model, shown one slice / frame at a time
async function uploadVolume(file) {
  const model = $("#model").value;
  const method = chosenMethods().find((m) => VOLUME_METHODS.includes(m)) || "gradcam";
  setStatus("busy", `explaining ${file.name} with ${model} (${method})…`);
  try {
    const info = await api(`api/volume?model=${encodeURIComponent(model)}&method=${encodeURIComponent(method)}`, {
      method: "POST",
      body: file,
      headers: { "Content-Type": "application/octet-stream", "X-Filename": encodeURIComponent(file.name) },
    });
    showVolume(info);
  } catch (e) {
    showError(e.message, e.status);
  }
}

function showVolume(info) {
  state.image = null;
  state.result = null;
  $("#photo-box").hidden = true;
  $("#predictions-box").hidden = true;
  $("#downloads").hidden = true;
  $("#explain-btn").disabled = true;
  const axes = Object.keys(info.axes);
  const axisSel = el("select", { id: "volume-axis", "aria-label": "slice axis" },
    ...axes.map((a) => el("option", { value: a, text: a })));
  const slider = el("input", { type: "range", id: "volume-slider", min: 0, step: 1, "aria-label": "slice" });
  const where = el("output", { id: "volume-where" });
  const img = el("img", { id: "volume-slice", class: "volume-slice", alt: `${info.method} map of ${info.name}` });
  const bar = el("div", { class: "volume-bar", id: "volume-bar" });
  bar.style.background = `linear-gradient(to right, ${info.scale.colors.join(", ")})`;
  const fmt = (v) => Math.abs(v) >= 100 || (Math.abs(v) < 0.01 && v !== 0) ? v.toExponential(2) : v.toFixed(3);
  const ends = el("div", { class: "volume-bar-ends" }, el("span", { text: fmt(info.scale.min) }),
    el("span", { text: info.scale.kind === "diverging" ? "0" : "" }), el("span", { text: fmt(info.scale.max) }));
  const show = () => {
    const axis = axisSel.value, i = parseInt(slider.value, 10);
    img.src = `api/volume/${info.id}/slice/${axis}/${i}.png?alpha=${$("#opacity").value}`;
    img.style.aspectRatio = `${1 / info.aspect[axis]}`;
    const t = info.timestamps ? ` · ${info.timestamps[i].toFixed(2)} s` : "";
    const peak = i === info.start[axis] ? " · peak" : "";
    where.textContent = `${axis} ${i} / ${info.axes[axis] - 1}${t}${peak}`;
  };
  const setAxis = () => {
    slider.max = info.axes[axisSel.value] - 1;
    slider.value = info.start[axisSel.value];
    show();
  };
  axisSel.addEventListener("change", setAxis);
  slider.addEventListener("input", show);
  const viewer = el("div", { class: "panel volume-viewer", id: "volume-viewer", "data-kind": info.kind },
    el("div", { class: "row" }, info.kind === "clip" ? el("span", { text: "frame" }) : axisSel, slider, where),
    img, bar, ends,
    el("div", { class: "caption" }, el("b", { text: `${info.method} · ${info.label}` }),
      el("span", { text: ` · ${info.model} · ${info.name} · ${info.shape.join("×")}` +
        (info.kind === "volume" ? ` · voxel ${info.spacing.map((s) => s.toFixed(2)).join("×")} mm` : "") })),
    el("p", { class: "hint", text: "one colour scale for the whole " + (info.kind === "clip" ? "clip" : "volume") +
      "; the slider starts at the map's peak" }));
  $("#panels").replaceChildren(viewer);
  setAxis();
  setStatus("done", `${info.name}: ${info.kind === "clip" ? "move the frame slider" : "choose an axis and move the slider"}.`);
}

// ---------------------------------------------------------------------------------------- explain
function chosenMethods() {
  return [...document.querySelectorAll("#methods input:checked:not(:disabled)")].map((c) => c.value);
}

function newJobId() {
  return "j" + Date.now().toString(36) + Math.random().toString(36).slice(2, 10);
}

// poll the request's progress: fraction done, ETA and the method's cost estimate
function watchProgress(job, methods) {
  let stopped = false;
  const bar = $("#progress");
  bar.value = 0;
  bar.hidden = false;
  const tick = async () => {
    if (stopped) return;
    try {
      const p = await api(`api/progress/${job}`);
      if (stopped) return;
      if (p.state === "explaining" || p.state === "predicting" || p.state === "waiting") {
        bar.value = p.fraction;
        const what = p.method ? `${p.method} (${p.methods_done + 1} of ${p.methods})` : p.state;
        const parts = [`${what}: ${Math.round(100 * p.fraction)}% done`];
        if (p.eta) parts.push(`about ${p.eta} left`);
        if (p.estimate) parts.push(p.estimate);
        setStatus("busy", parts.join(" · "));
        bar.title = parts.join(" · ");
      }
    } catch (e) { /* a missed poll is harmless */ }
    if (!stopped) setTimeout(tick, 400);
  };
  setTimeout(tick, 200);
  return () => { stopped = true; bar.hidden = true; };
}

// a detector: list its detections (class, score, box), drawn on the photo; a click explains one
async function listDetections() {
  const model = $("#model").value;
  setStatus("busy", `detecting with ${model}…`);
  try {
    const r = await api(`api/detections/${encodeURIComponent(state.image.id)}?model=${encodeURIComponent(model)}`);
    state.detections = r;
    renderDetections(r);
    setStatus("done", `${r.detections.length} detection(s) by ${model}; click one to explain it`);
  } catch (e) {
    showError(e.message, e.status);
  }
}

function renderDetections(r) {
  const tbody = $("#predictions tbody");
  tbody.replaceChildren();
  for (const d of r.detections.slice(0, 20)) {
    const pick = () => explainDetection(d.index);
    tbody.append(el("tr", { class: "pred detection", "data-index": d.index, tabindex: 0,
      title: "click to explain this detection", onclick: pick, onkeydown: (e) => { if (e.key === "Enter") pick(); } },
    el("td", { text: "#" + d.rank }), el("td", { class: "name", text: d.class_name }),
    el("td", { class: "prob", text: d.score.toFixed(3) }),
    el("td", { class: "box", text: d.box.map((v) => Math.round(v)).join(",") })));
  }
  $("#predictions-box").hidden = false;
  drawDetectionBoxes(r.detections.slice(0, 20));
}

function drawDetectionBoxes(dets) {
  const img = $("#photo");
  if (!img || !img.parentElement) return;
  let layer = $("#det-layer");
  if (!layer) {
    layer = document.createElementNS(SVG, "svg");
    layer.id = "det-layer";
    img.parentElement.style.position = "relative";
    img.parentElement.append(layer);
  }
  const w = img.naturalWidth || state.image.display_width || 1, h = img.naturalHeight || state.image.display_height || 1;
  layer.setAttribute("viewBox", `0 0 ${w} ${h}`);
  layer.style.width = img.clientWidth + "px";  // over the photo, in its displayed pixels
  layer.style.height = img.clientHeight + "px";
  layer.setAttribute("class", "det-layer");
  layer.replaceChildren();
  for (const d of dets) {
    const [x0, y0, x1, y1] = d.display_box;
    layer.append(svg("rect", { x: x0, y: y0, width: x1 - x0, height: y1 - y0, class: "det-box", "data-index": d.index }));
  }
}

async function explainDetection(index) {
  clearError();
  const methods = chosenMethods();
  if (!methods.length) { showError("choose at least one method"); return; }
  const body = { image_id: state.image.id, model: $("#model").value, methods, index };
  setStatus("busy", `explaining detection ${index} with ${methods.join(", ")}…`);
  try {
    const res = await api("api/explain_detection", { method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body) });
    state.result = res;
    render(res);
    setStatus("done", `done: detection ${index} of ${res.model}`);
  } catch (e) {
    showError(e.message, e.status);
  }
}

async function runExplain(classes) {
  if (!state.image) return;
  clearError();
  if (state.detector && classes === null) { await listDetections(); return; }
  const methods = chosenMethods();
  if (!methods.length) { showError("choose at least one method"); return; }
  const body = {
    image_id: state.image.id,
    model: $("#model").value,
    methods,
    topk: 5,
    explain: Math.max(1, Math.min(5, parseInt($("#n-explain").value, 10) || 2)),
    classes,
    job: newJobId(),
  };
  const prompts = $("#prompt-row").hidden ? [] : $("#prompts").value.split(",").map((s) => s.trim()).filter(Boolean);
  if (prompts.length) body.prompts = prompts.slice(0, 10);
  setStatus("busy", `explaining with ${methods.join(", ")}… (a request waits while the model is busy)`);
  $("#explain-btn").disabled = true;
  const t0 = performance.now();
  const stop = watchProgress(body.job, methods);
  try {
    const res = await api("api/explain", { method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body) });
    state.result = res;
    render(res);
    const total = res.methods.reduce((s, m) => s + (m.cost_ms || 0), 0);
    setStatus("done", `done: ${res.model_label || res.model}, ${res.methods.length} method(s), ${res.classes.length} class(es); ` +
      `compute ${fmtMs(total)}, round trip ${Math.round(performance.now() - t0)} ms`);
  } catch (e) {
    showError(e.message, e.status);
  } finally {
    stop();
    $("#explain-btn").disabled = false;
  }
}

function render(res) {
  if (res.detection === undefined) renderPredictions(res);  // a detection's result keeps the detections list
  const panels = $("#panels");
  panels.replaceChildren();
  for (const m of res.methods) {
    const row = el("div", { class: "method-row", "data-method": m.name });
    const first = res.panels.find((q) => q.method === m.name);
    const head = el("h3", { text: m.title, title: first && first.layer ? `layer: ${first.layer}` : m.kind + " method" });
    if (m.error) {
      row.append(head, el("div", { class: "error", text: m.error }));
      panels.append(row);
      continue;
    }
    const cost = m.cost_ms === null ? "cached (no new work)" : `${fmtMs(m.cost_ms)} for this request`;
    head.append(el("span", { class: "cost", "data-ms": m.cost_ms === null ? "" : m.cost_ms,
      text: `${cost}${m.estimate ? ` (estimated ${m.estimate})` : ""}` +
        `${m.signed ? " · signed map: diverging colours centred at 0" : ""}` +
        `${m.box ? "" : " · no box by default (pixel-level map)"}` }));
    row.append(head);
    const cells = el("div", { class: "cells" });
    for (const c of res.classes) {
      const p = res.panels.find((q) => q.method === m.name && q.cls === c);
      if (p) cells.append(renderPanel(res, m, p));
    }
    row.append(cells);
    panels.append(row);
  }
  const npy = $("#download-npy");
  npy.replaceChildren();
  for (const m of res.methods) {
    if (m.npy_url) npy.append(el("a", { href: m.npy_url, download: "", "data-method": m.name, text: `${m.title} maps (NPY)` }));
  }
  $("#downloads").hidden = false;
  updateOpacity();
  updateHeat();
  updateBoxes();
}

function renderPredictions(res) {
  const tbody = $("#predictions tbody");
  tbody.replaceChildren();
  for (const p of res.predictions) {
    const explained = res.classes.includes(p.id);
    const bar = el("div", { class: "bar" });
    bar.style.width = Math.max(1, Math.round(120 * p.prob)) + "px";
    const pick = () => { if (!state.result.classes.includes(p.id)) runExplain([...state.result.classes, p.id]); };
    const tr = el("tr", { class: "pred" + (explained ? " explained" : ""), "data-class": p.id, tabindex: 0,
      title: explained ? "explained below" : "click to explain this class", onclick: pick,
      onkeydown: (e) => { if (e.key === "Enter") pick(); } },
    el("td", { text: "#" + p.rank }), el("td", { class: "name", text: p.name }),
    el("td", { class: "prob", text: fmtPct(p.prob) }), el("td", { class: "barcell" }, bar));
    tbody.append(tr);
  }
  $("#predictions-box").hidden = false;
}

function renderPanel(res, m, p) {
  const w = res.image.display_width, h = res.image.display_height;
  const box = svg("svg", { viewBox: `0 0 ${w} ${h}`, preserveAspectRatio: "none" });
  box.append(svg("rect", { class: "box" }));
  const stack = el("div", { class: "stack" },
    el("img", { class: "photo", src: res.image.url, alt: "photo" }),
    el("img", { class: "heat", "data-src": p.heat_url, alt: `${m.title} map of ${p.name}` }), box);
  const panel = el("div", { class: "panel", "data-method": p.method, "data-class": p.cls }, stack,
    el("div", { class: "caption" }, el("b", { text: p.title }),
      el("span", { text: ` · logit ${p.score.toFixed(2)}` + (p.classes_in_call > 1 ? ` · ${fmtMs(p.ms)} for ${p.classes_in_call} classes` : ` · ${fmtMs(p.ms)}`) })));
  panel._boxes = p.boxes;
  panel._box = m.box;
  if (p.detail_url) panel.append(el("img", { class: "detail", src: p.detail_url, alt: `${m.title} pixel detail` }),
    el("div", { class: "caption", text: "pixel detail: the attribution as colour (grey = 0)" }));
  const faith = el("div", { class: "faith" });
  panel.append(el("button", { class: "small faith-btn", type: "button", text: "deletion / insertion curves",
    onclick: (e) => runCurves(res, p, faith, e.target) }), faith);
  return panel;
}

// ---------------------------------------------------------------------------------------- controls
function updateOpacity() {
  const a = parseFloat($("#opacity").value);
  $("#opacity-value").textContent = a.toFixed(2);
  for (const img of document.querySelectorAll(".stack img.heat")) img.style.opacity = a;
  const vs = $("#volume-slider");
  if (vs) vs.dispatchEvent(new Event("input"));  // a volume slice is rendered by the server at this opacity
  updateDownloads();
}

function thresholdIndex() {
  const t = parseFloat($("#threshold").value);
  let best = 0;
  state.thresholds.forEach((v, i) => { if (Math.abs(v - t) < Math.abs(state.thresholds[best] - t)) best = i; });
  return best;
}

function updateBoxes() {
  const t = parseFloat($("#threshold").value);
  $("#threshold-value").textContent = t.toFixed(2);
  const show = $("#show-box").checked;
  const pixel = $("#box-pixel").checked;
  const i = thresholdIndex();
  for (const panel of document.querySelectorAll(".panel")) {
    const rect = $("rect.box", panel);
    const b = panel._boxes ? panel._boxes[i] : null;
    if (!b || !show || b[0] < 0 || !(panel._box || pixel)) {
      rect.setAttribute("visibility", "hidden");
      rect.dataset.box = b ? b.join(",") : "";
      continue;
    }
    rect.setAttribute("x", b[0]);
    rect.setAttribute("y", b[1]);
    rect.setAttribute("width", b[2] - b[0]);
    rect.setAttribute("height", b[3] - b[1]);
    rect.setAttribute("visibility", "visible");
    rect.dataset.box = b.join(",");
  }
  updateDownloads();
}

function updateHeat() {
  const cmap = $("#cmap").value;
  for (const img of document.querySelectorAll(".stack img.heat")) img.src = `${img.dataset.src}?cmap=${encodeURIComponent(cmap)}`;
  updateDownloads();
}

function updateDownloads() {
  const res = state.result;
  if (!res) return;
  const q = new URLSearchParams({ alpha: $("#opacity").value, threshold: state.thresholds[thresholdIndex()], cmap: $("#cmap").value,
    pixel_boxes: $("#box-pixel").checked });
  $("#download-figure").href = `${res.figure_url}?${q}`;
  $("#download-json").href = `${res.summary_url}?threshold=${state.thresholds[thresholdIndex()]}`;
}

// ---------------------------------------------------------------------------------------- curves
async function runCurves(res, p, box, button) {
  clearError();
  button.disabled = true;
  box.textContent = "computing deletion and insertion curves…";
  try {
    const c = await api("api/faithfulness", { method: "POST", headers: { "Content-Type": "application/json" },
      body: JSON.stringify({ result_id: res.id, method: p.method, cls: p.cls }) });
    box.replaceChildren(plotCurves(c), el("div", { class: "caption",
      text: `probability of ${p.name} as pixels are deleted (red; lower AUC = more faithful) or inserted into a ` +
        `blurred copy (blue; higher = more faithful); dashed: a random map · ${fmtMs(c.ms)}` }));
    box.dataset.deletionAuc = c.deletion.map.auc;
    box.dataset.insertionAuc = c.insertion.map.auc;
  } catch (e) {
    box.textContent = "";
    showError(e.message, e.status);
  } finally {
    button.disabled = false;
  }
}

function plotCurves(c) {
  const W = 300, H = 200, L = 34, R = 8, T = 8, B = 58;
  const s = svg("svg", { viewBox: `0 0 ${W} ${H}` });
  const x = (f) => L + f * (W - L - R), y = (p) => H - B - p * (H - T - B);
  s.append(svg("line", { class: "axis", x1: L, y1: y(0), x2: W - R, y2: y(0) }), svg("line", { class: "axis", x1: L, y1: y(0), x2: L, y2: y(1) }));
  for (const v of [0, 0.5, 1]) {
    const t = svg("text", { x: L - 4, y: y(v) + 3, "text-anchor": "end" }); t.textContent = v; s.append(t);
  }
  const xl = svg("text", { x: (L + W - R) / 2, y: H - B + 16, "text-anchor": "middle" });
  xl.textContent = "fraction of pixels, most important first";
  s.append(xl);
  const line = (curve, cls) => svg("polyline", { class: cls, points: curve.fractions.map((f, i) => `${x(f).toFixed(1)},${y(curve.probs[i]).toFixed(1)}`).join(" ") });
  s.append(line(c.deletion.random, "del rand"), line(c.insertion.random, "ins rand"), line(c.deletion.map, "del"), line(c.insertion.map, "ins"));
  const legend = [
    ["del", `deletion AUC ${c.deletion.map.auc.toFixed(3)} (random ${c.deletion.random.auc.toFixed(3)})`],
    ["ins", `insertion AUC ${c.insertion.map.auc.toFixed(3)} (random ${c.insertion.random.auc.toFixed(3)})`],
  ];
  legend.forEach(([cls, text], i) => {
    const ly = H - B + 30 + 13 * i;
    s.append(svg("line", { class: cls, x1: L + 6, x2: L + 20, y1: ly, y2: ly }));
    const t = svg("text", { x: L + 24, y: ly + 3 }); t.textContent = text; s.append(t);
  });
  return s;
}

document.addEventListener("DOMContentLoaded", init);
