// The captioning page: pick or drop an image, choose a caption mode, see the caption, the alternatives
// and (attention decoders) a heatmap per word. Talks only to this server (relative URLs).
"use strict";

const $ = (id) => document.getElementById(id);
let currentFile = null;
let previewUrl = null;
let health = null;
let requestNo = 0;

function setStatus(text, state) {
  $("status").textContent = text;
  $("status").hidden = !text;
  if (state) $("result").dataset.state = state;
}

function showError(message) {
  $("error").textContent = message;
  $("error").hidden = false;
  setStatus("", "error");
}

function fmtScore(s) {
  return s === null || s === undefined ? "" : "score " + s.toFixed(3);
}

async function loadHealth() {
  try {
    const r = await fetch("health", { cache: "no-store" });
    health = await r.json();
  } catch (e) {
    $("model").textContent = "The server does not answer: " + e;
    return;
  }
  const m = health.model;
  $("model").textContent = `Model ${m.bundle}: ${m.decoder} decoder on ${m.backbone} features` +
    (m.attention ? " — with attention heatmaps" : "") + (m.blind ? " (image-blind control)" : "");
  const select = $("mode");
  select.replaceChildren();
  for (const mode of health.modes) {
    const opt = document.createElement("option");
    opt.value = mode.name;
    opt.textContent = mode.name.replace(/_/g, " ");
    opt.title = mode.description;
    if (mode.name === health.default_mode) opt.selected = true;
    select.append(opt);
  }
  describeMode();
  $("key-row").hidden = !health.auth_required;
  $("want-attention").parentElement.hidden = !m.attention;
  $("go").disabled = !currentFile;
}

function describeMode() {
  if (!health) return;
  const mode = health.modes.find((x) => x.name === $("mode").value);
  $("mode-description").textContent = mode ? mode.description : "";
}

function chooseFile(file) {
  if (!file) return;
  currentFile = file;
  if (previewUrl) URL.revokeObjectURL(previewUrl);
  previewUrl = URL.createObjectURL(file);
  $("preview").src = previewUrl;
  $("preview").hidden = false;
  $("drop-text").textContent = file.name + " — drop or click for another";
  $("go").disabled = false;
  caption();
}

async function caption() {
  if (!currentFile) return;
  const mine = ++requestNo;
  const form = new FormData();
  form.append("image", currentFile, currentFile.name || "image");
  form.append("caption_mode", $("mode").value || "consistent");
  const wantMaps = !!(health && health.model.attention && $("want-attention").checked);
  form.append("attention", wantMaps ? "true" : "false");
  const headers = {};
  const key = $("api-key").value.trim();
  if (key) headers["X-API-Key"] = key;
  $("error").hidden = true;
  setStatus("Captioning…", "busy");
  $("go").disabled = true;
  let body;
  try {
    const r = await fetch("caption", { method: "POST", body: form, headers });
    body = await r.json().catch(() => ({ error: { message: `HTTP ${r.status} without a JSON answer` } }));
    if (mine !== requestNo) return; // a newer request was sent meanwhile
    if (!r.ok) {
      showError((body.error && body.error.message) || `HTTP ${r.status}`);
      return;
    }
  } catch (e) {
    if (mine === requestNo) showError("The request failed: " + e);
    return;
  } finally {
    if (mine === requestNo) $("go").disabled = false;
  }
  render(body);
}

function render(res) {
  const cap = $("caption");
  cap.replaceChildren();
  const words = res.attention && res.attention.words ? res.attention.words : null;
  if (!res.caption) {
    const span = document.createElement("span");
    span.className = "empty";
    span.textContent = "(empty caption)";
    cap.append(span);
  } else if (words) {
    words.forEach((w, i) => {
      if (i) cap.append(" ");
      const span = document.createElement("span");
      span.textContent = w.word;
      span.dataset.index = i;
      span.addEventListener("mouseenter", () => highlight(i, true));
      span.addEventListener("mouseleave", () => highlight(i, false));
      cap.append(span);
    });
    cap.title = res.caption;
  } else {
    cap.textContent = res.caption;
  }
  $("score").textContent = `${res.mode.replace(/_/g, " ")} mode · ${fmtScore(res.score)}`;
  const alts = $("alternatives");
  alts.replaceChildren();
  for (const alt of res.alternatives) {
    const li = document.createElement("li");
    li.textContent = alt.caption || "(empty caption)";
    const s = document.createElement("span");
    s.className = "score";
    s.textContent = fmtScore(alt.score);
    li.append(s);
    alts.append(li);
  }
  $("no-alternatives").hidden = res.alternatives.length > 0;
  renderHeatmaps(res);
  const t = res.timings;
  $("timings").textContent = `server ${t.total_ms.toFixed(1)} ms: decode ${t.decode_ms.toFixed(1)}, ` +
    `queue ${t.queue_ms.toFixed(1)}, model ${t.model_ms.toFixed(1)} (batch of ${t.batch_size})` +
    (t.attention_ms !== null && t.attention_ms !== undefined ? `, heatmaps ${t.attention_ms.toFixed(1)}` : "") + " ms";
  $("answer").hidden = false;
  setStatus("", "done");
}

function renderHeatmaps(res) {
  const box = $("heatmaps");
  box.replaceChildren();
  const note = $("attention-note");
  const att = res.attention;
  if (!att) {
    // the server says why there are none (e.g. the Perceiver attends to latents, not to the image)
    const why = res.attention_unavailable || "";
    const none = why || (health && health.model.attention_note) || "";
    note.textContent = health && health.model.attention
      ? (res.attention === null ? "No attention maps for this caption" + (why ? ": " + why : "") + "."
                                : "Heatmaps were not asked for.")
      : (none ? none[0].toUpperCase() + none.slice(1) + "."
              : "This model's decoder has no visual attention, so there are no heatmaps.");
    note.hidden = false;
    return;
  }
  note.textContent = att.source ? `Maps: ${att.source}, over ${att.shown}.` : "";
  note.hidden = !att.source;
  const fig = (src, label, cls, i) => {
    const f = document.createElement("figure");
    if (cls) f.className = cls;
    if (i !== undefined) {
      f.dataset.index = i;
      f.addEventListener("mouseenter", () => highlight(i, true));
      f.addEventListener("mouseleave", () => highlight(i, false));
    }
    const img = document.createElement("img");
    img.src = src;
    img.alt = label;
    const c = document.createElement("figcaption");
    c.textContent = label;
    f.append(img, c);
    return f;
  };
  box.append(fig(att.image, "as the model saw it", "input"));
  att.words.forEach((w, i) => box.append(fig(w.heatmap, w.word || "·", "word", i)));
}

function highlight(i, on) {
  for (const el of document.querySelectorAll(`[data-index="${i}"]`)) el.classList.toggle("on", on);
}

function setup() {
  const drop = $("drop");
  $("file").addEventListener("change", (e) => chooseFile(e.target.files[0]));
  for (const ev of ["dragenter", "dragover"]) {
    drop.addEventListener(ev, (e) => { e.preventDefault(); drop.classList.add("over"); });
  }
  for (const ev of ["dragleave", "drop"]) {
    drop.addEventListener(ev, (e) => { e.preventDefault(); drop.classList.remove("over"); });
  }
  drop.addEventListener("drop", (e) => chooseFile(e.dataTransfer.files[0]));
  drop.addEventListener("keydown", (e) => {
    if (e.key === "Enter" || e.key === " ") { e.preventDefault(); $("file").click(); }
  });
  document.addEventListener("paste", (e) => {
    const item = [...(e.clipboardData || {}).items || []].find((x) => x.type.startsWith("image/"));
    if (item) chooseFile(item.getAsFile());
  });
  $("mode").addEventListener("change", () => { describeMode(); caption(); });
  $("want-attention").addEventListener("change", caption);
  $("go").addEventListener("click", caption);
  loadHealth();
}

setup();
