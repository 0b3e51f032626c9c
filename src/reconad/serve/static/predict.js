// reconad serve: upload images, show heat maps and decisions, re-label with a threshold slider (no re-run).
"use strict";

const state = { model: null, items: [], threshold: null };
const $ = (id) => document.getElementById(id);

function fmt(x, digits = 4) { return x === null || x === undefined ? "–" : Number(x).toFixed(digits); }

// The calibration's decision rule (reconad.deploy: anomalous when score > threshold), applied in the browser to
// the normalised score, which is monotone in the score: the slider re-labels without re-running the model.
function decide(item) {
  if (!state.model.calibrated || item.result.normalised_score === null) return null;
  return item.result.normalised_score > state.threshold ? "anomalous" : "normal";
}

async function loadModel() {
  const response = await fetch("/model");
  state.model = await response.json();
  const m = state.model, md = m.metadata || {};
  $("model").textContent = [md.method, md.backbone, `${m.image_size} px`,
    m.calibrated ? `threshold ${fmt(m.threshold)} (${md.threshold_source || "calibration"})` : "not calibrated"]
    .filter(Boolean).join(" · ");
  const bar = m.map.colorbar;
  $("colorbar").style.background = `linear-gradient(to right, ${bar.join(", ")})`;
  $("cb-units").textContent = m.map.units;
  $("cb-min").textContent = m.map.vmin === null ? "min" : fmt(m.map.vmin, 2);
  $("cb-max").textContent = m.map.vmax === null ? "max" : fmt(m.map.vmax, 2);
  const slider = $("threshold");
  if (m.calibrated) {
    state.threshold = m.normalised_threshold;
    updateSliderRange();
  } else {
    slider.disabled = true;
    $("reset-threshold").disabled = true;
    $("threshold-value").textContent = "no calibration";
    const note = $("calibration-note");
    note.hidden = false;
    note.textContent = m.note;
  }
  fetch("/health").then((r) => r.json()).then((h) => { $("results-link").hidden = !h.results; });
}

function updateSliderRange() {
  const m = state.model, slider = $("threshold");
  const values = [m.normalised_threshold, m.map.vmin, m.map.vmax,
    ...state.items.map((i) => i.result.normalised_score)].filter((v) => v !== null && Number.isFinite(v));
  let lo = Math.min(...values), hi = Math.max(...values);
  const pad = 0.02 * (hi - lo || 1);
  lo -= pad; hi += pad;
  slider.min = lo; slider.max = hi; slider.step = (hi - lo) / 1000;
  slider.value = state.threshold;
  $("threshold-value").textContent = fmt(state.threshold, 3);
}

function render() {
  const gallery = $("gallery");
  state.items.sort((a, b) => b.result.score - a.result.score);
  let anomalous = 0;
  for (const item of state.items) {
    const label = decide(item);
    if (label === "anomalous") anomalous += 1;
    item.card.classList.toggle("anomalous", label === "anomalous");
    item.card.classList.toggle("normal", label === "normal");
    const el = item.card.querySelector(".label");
    el.textContent = label === null ? "no decision (no calibration)" : label;
    el.className = "label " + (label || "");
    gallery.appendChild(item.card);  // appending in order re-sorts the gallery
  }
  const n = state.items.length;
  $("counts").textContent = n === 0 ? "no images yet"
    : state.model.calibrated ? `${anomalous} of ${n} anomalous at ${fmt(state.threshold, 3)}` : `${n} images`;
  $("download").disabled = n === 0;
}

function makeCard(file, result) {
  const card = document.createElement("div");
  card.className = "card";
  card.dataset.filename = result.filename;
  const input = URL.createObjectURL(file);
  const heat = result.map ? `data:image/png;base64,${result.map.png}` : "";
  const mask = result.mask ? `<img class="layer region" alt="predicted region" src="data:image/png;base64,${result.mask.png}">` : "";
  card.innerHTML = `
    <h3></h3>
    <div class="panels">
      <figure><div class="stack"><img class="input" alt="input" src="${input}"></div><figcaption>input</figcaption></figure>
      <figure><div class="stack"><img alt="input" src="${input}"><img class="layer heat overlay" alt="heat map"
        src="${heat}"></div><figcaption>heat map (${result.map ? result.map.units : ""})</figcaption></figure>
      <figure><div class="stack"><img alt="input" src="${input}">${mask}</div>
        <figcaption>${result.mask ? `predicted region (${fmt(100 * result.mask_fraction, 1)} %)`
          : "no region (no pixel calibration)"}</figcaption></figure>
    </div>
    <div class="facts">
      <span>score <b class="score" data-score="${result.score}">${fmt(result.score)}</b></span>
      <span>normalised <b class="normalised-score" data-value="${result.normalised_score}">${fmt(result.normalised_score, 3)}</b></span>
      <span class="label"></span>
    </div>`;
  card.querySelector("h3").textContent = result.filename;
  const overlay = card.querySelector("img.overlay");
  overlay.addEventListener("load", () => card.classList.add("ready"));
  return card;
}

async function upload(files) {
  const errors = $("errors");
  const perRequest = state.model.limits.max_files;
  for (let start = 0; start < files.length; start += perRequest) {
    const chunk = files.slice(start, start + perRequest);
    const body = new FormData();
    chunk.forEach((f) => body.append("files", f, f.name));
    const response = await fetch("/predict?maps=true", { method: "POST", body });
    const answer = await response.json().catch(() => ({ detail: response.statusText }));
    if (!response.ok) {
      const li = document.createElement("li");
      li.textContent = `${chunk.map((f) => f.name).join(", ")}: ${answer.detail} (HTTP ${response.status})`;
      errors.appendChild(li);
      continue;
    }
    answer.results.forEach((result, i) => state.items.push({ result, card: makeCard(chunk[i], result) }));
  }
  if (state.model.calibrated) updateSliderRange();
  render();
}

function csvField(v) {
  const s = v === null || v === undefined ? "" : String(v);
  return /[",\n]/.test(s) ? `"${s.replace(/"/g, '""')}"` : s;
}

function downloadCsv() {
  const header = ["filename", "score", "normalised_score", "threshold_normalised", "label", "calibrated_label"];
  const rows = state.items.map((i) => [i.result.filename, i.result.score, i.result.normalised_score,
    state.model.calibrated ? state.threshold : null, decide(i), i.result.label]);
  const text = [header, ...rows].map((r) => r.map(csvField).join(",")).join("\n") + "\n";
  const link = document.createElement("a");
  link.href = URL.createObjectURL(new Blob([text], { type: "text/csv" }));
  link.download = "reconad_results.csv";
  link.click();
}

function wire() {
  const drop = $("drop");
  $("files").addEventListener("change", (e) => { upload([...e.target.files]); e.target.value = ""; });
  drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (e) => {
    e.preventDefault(); drop.classList.remove("over"); upload([...e.dataTransfer.files]);
  });
  $("threshold").addEventListener("input", (e) => {
    state.threshold = Number(e.target.value);
    $("threshold-value").textContent = fmt(state.threshold, 3);
    render();
  });
  $("reset-threshold").addEventListener("click", () => {
    state.threshold = state.model.normalised_threshold; updateSliderRange(); render();
  });
  $("download").addEventListener("click", downloadCsv);
}

wire();
loadModel();
