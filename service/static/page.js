// The try-it page: pick a model, send an image (file, drop or drawing), show what comes back.

import { Picture, postPicture, query, request } from "./api.js";
import { renderCard } from "./card.js";
import { DrawingPad } from "./draw.js";
import { Explainer } from "./explainer.js";

const $ = (id) => document.getElementById(id);
const percent = (p) => `${(p * 100).toFixed(p >= 0.1 ? 1 : 2)}%`;

const state = {
  models: [], // GET /models: ready models with their versions
  card: null, // the model card of the chosen version
  image: null, // the Picture last sent, to redo it with another model, layer or top-k
  preview: null, // its object URL
  run: 0, // answers to an older run are dropped
};

function showError(error) {
  const box = $("error");
  const title = error.title ? `${error.title}: ` : "";
  box.textContent = `${title}${error.message}`;
  box.hidden = false;
  $("status").textContent = "";
}

function clearError() {
  $("error").hidden = true;
  $("error").textContent = "";
}

function chosen() {
  return { model: $("model").value, version: $("version").value };
}

// ---- models and versions ---------------------------------------------------------------------

async function loadModels() {
  let listing;
  try {
    listing = await request("/models");
  } catch (error) {
    showError(error);
    setTimeout(loadModels, 3000);
    return;
  }
  const ready = listing.models.filter((m) => m.ready);
  if (!ready.length) {
    const loading = listing.models.some((m) => m.versions.some((v) => v.status === "loading"));
    $("status").textContent = loading
      ? "The models are still loading…"
      : "No model is ready: see GET /models for the reasons.";
    setTimeout(loadModels, 2000);
    return;
  }
  state.models = ready;
  const select = $("model");
  select.replaceChildren(
    ...ready.map((m) => new Option(`${m.name} (${m.versions.find((v) => v.status === "ready").architecture})`, m.name)),
  );
  select.disabled = false;
  fillVersions();
  $("status").textContent = "Choose an image, drop one, or draw a digit.";
  await loadCard();
}

function fillVersions() {
  const model = state.models.find((m) => m.name === $("model").value);
  const select = $("version");
  const options = model.versions
    .filter((v) => v.status === "ready")
    .map((v) => {
      const aliases = Object.entries(model.aliases)
        .filter(([, target]) => target === v.version)
        .map(([alias]) => alias);
      const notes = [v.version === model.serving_version ? "serving" : "", ...aliases].filter(Boolean);
      const label = notes.length ? `v${v.version} (${notes.join(", ")})` : `v${v.version}`;
      return new Option(label, String(v.version), false, v.version === model.serving_version);
    });
  select.replaceChildren(...options);
  select.disabled = options.length < 2;
}

async function loadCard() {
  const { model, version } = chosen();
  try {
    state.card = await request(`/models/${encodeURIComponent(model)}/${encodeURIComponent(version)}`);
  } catch (error) {
    showError(error);
    return;
  }
  renderCard(state.card);
  fillLayers(state.card);
  explainer.setModel(state.card);
  // the drawing pad makes sense for one-channel (digit-like) models only
  $("draw-panel").hidden = state.card.input.channels !== 1;
  if (state.image) {
    await classify(state.image);
  }
}

// ---- classifying -----------------------------------------------------------------------------

function predictUrl(extra) {
  const { model, version } = chosen();
  const topK = Math.max(1, Number.parseInt($("top-k").value, 10) || 5);
  return `/predict${query({ model, version, top_k: topK, ...extra })}`;
}

function renderPredictions(answer) {
  const result = answer.results[0];
  const list = $("predictions");
  list.replaceChildren(
    ...result.predictions.map((p) => {
      const item = document.createElement("li");
      const label = document.createElement("span");
      label.className = "label";
      label.textContent = p.label;
      const bar = document.createElement("span");
      bar.className = "bar";
      const fill = document.createElement("span");
      fill.className = "fill";
      fill.style.width = `${Math.max(p.probability * 100, 0.5)}%`;
      bar.append(fill);
      const value = document.createElement("span");
      value.className = "value";
      value.textContent = percent(p.probability);
      item.append(label, bar, value);
      return item;
    }),
  );
  const top = result.predictions[0];
  $("summary").textContent =
    `${answer.model.name} v${answer.model.version} says ${top.label} with ${percent(top.probability)} probability.`;
  $("summary").dataset.top = top.label;
  const heatmap = result.heatmap;
  const gradcam = $("gradcam");
  gradcam.hidden = !heatmap;
  if (!heatmap) {
    gradcam.removeAttribute("src");
    $("gradcam-caption").textContent = `No heatmaps for this model: ${state.card.heatmaps_unavailable}`;
    return;
  }
  gradcam.src = `data:image/png;base64,${heatmap.png}`;
  gradcam.alt = `Grad-CAM heatmap for class ${top.label} at layer ${heatmap.layer}, over the image`;
  $("gradcam-caption").textContent =
    `Grad-CAM at ${heatmap.layer} for class ${heatmap.class_index === top.class_index ? top.label : heatmap.class_index}: red is where the evidence for it sits.`;
}

// A new image (a Blob), or the one shown again (its Picture: the service may still hold it).
async function classify(image) {
  const run = ++state.run;
  const picture = image instanceof Picture ? image : new Picture(image);
  const fresh = picture !== state.image;
  state.image = picture;
  clearError();
  if (fresh) {
    if (state.preview) {
      URL.revokeObjectURL(state.preview);
    }
    state.preview = URL.createObjectURL(picture.blob);
    $("preview").src = state.preview;
    $("preview").alt = picture.blob.name ? `The image sent: ${picture.blob.name}` : "The drawing sent";
  }
  $("status").textContent = "Classifying…";
  const started = performance.now();
  let answer;
  try {
    // a model without heatmaps (an imported graph torch cannot run) is only classified
    const extra = state.card?.heatmaps_unavailable ? {} : { heatmap: "gradcam" };
    answer = await postPicture(predictUrl(extra), picture);
  } catch (error) {
    if (run === state.run) {
      // what is on screen belongs to an earlier image: hide it rather than mislead
      $("results").hidden = true;
      $("explainer").hidden = true;
      showError(error);
    }
    return;
  }
  if (run !== state.run) {
    return;
  }
  $("results").hidden = false;
  renderPredictions(answer);
  $("status").textContent = `Answered in ${Math.round(performance.now() - started)} ms.`;
  // both name the image the service now holds instead of sending it again
  await Promise.all([showLayer(run), explainer.load(picture, chosen())]);
}

// ---- the layer walk --------------------------------------------------------------------------

function fillLayers(card) {
  const box = $("layers");
  const legend = document.createElement("legend");
  legend.className = "visually-hidden";
  legend.textContent = "Layer";
  const choices = card.heatmap_layers.map((layer, index) => {
    const label = document.createElement("label");
    const input = document.createElement("input");
    input.type = "radio";
    input.name = "layer";
    input.value = layer.name;
    input.checked = index === 0;
    input.addEventListener("change", () => showLayer(state.run));
    const shape = document.createElement("span");
    shape.className = "dim";
    shape.textContent = `${layer.channels}×${layer.height}×${layer.width}`;
    label.append(input, ` ${layer.name} `, shape);
    return label;
  });
  box.replaceChildren(legend, ...choices);
  $("activation").hidden = choices.length === 0;
  $("activation-caption").textContent = choices.length ? "" : "This model has no layers to walk.";
}

async function showLayer(run) {
  const picked = document.querySelector('input[name="layer"]:checked');
  if (!picked || !state.image) {
    return;
  }
  const layer = picked.value;
  const image = $("activation");
  image.setAttribute("aria-busy", "true");
  let answer;
  try {
    answer = await postPicture(predictUrl({ heatmap: "activation", layer, top_k: 1 }), state.image);
  } catch (error) {
    showError(error);
    return;
  } finally {
    image.removeAttribute("aria-busy");
  }
  if (run !== state.run || picked !== document.querySelector('input[name="layer"]:checked')) {
    return;
  }
  const heatmap = answer.results[0].heatmap;
  const point = state.card.heatmap_layers.find((l) => l.name === layer);
  image.src = `data:image/png;base64,${heatmap.png}`;
  image.alt = `Mean activation of the ${point.channels} maps at layer ${layer}, over the image`;
  image.dataset.layer = layer;
  $("activation-caption").textContent =
    `${layer}: mean of ${point.channels} maps of ${point.height}×${point.width}, read after ${point.reads}.`;
}

// ---- wiring ----------------------------------------------------------------------------------

const explainer = new Explainer(showError);
const pad = new DrawingPad($("pad"), $("pen"), () => classifyDrawing());

async function classifyDrawing() {
  if (!pad.inked) {
    showError({ title: "Nothing drawn", message: "draw a digit on the pad first" });
    return;
  }
  await classify(await pad.toBlob());
}

$("model").addEventListener("change", () => {
  fillVersions();
  loadCard();
});
$("version").addEventListener("change", () => loadCard());
$("top-k").addEventListener("change", () => state.image && classify(state.image));
$("file").addEventListener("change", (event) => {
  const [file] = event.target.files;
  if (file) {
    classify(file);
  }
});
$("classify-drawing").addEventListener("click", () => classifyDrawing());
$("clear").addEventListener("click", () => {
  pad.clear();
  $("pad").focus();
});

const drop = $("drop");
drop.addEventListener("dragover", (event) => {
  event.preventDefault();
  drop.classList.add("over");
});
drop.addEventListener("dragleave", () => drop.classList.remove("over"));
drop.addEventListener("drop", (event) => {
  event.preventDefault();
  drop.classList.remove("over");
  const [file] = event.dataTransfer.files;
  if (file) {
    classify(file);
  }
});

loadModels();
