// The review page: one captured image at a time, labelled into the dataset or discarded.

import { ProblemError, query, request } from "./api.js";

const $ = (id) => document.getElementById(id);
const GUESSES = 5;

const state = {
  model: null, // the model whose images are shown
  labels: [],
  items: [], // the oldest waiting, as the service listed them
  skipped: new Set(), // sha256s skipped: shown again once nothing else waits
  current: null,
  busy: false,
};

function percent(probability) {
  return `${(probability * 100).toFixed(1)}%`;
}

function showError(error) {
  const box = $("error");
  if (!error) {
    box.hidden = true;
    box.textContent = "";
    return;
  }
  box.textContent = error instanceof ProblemError ? `${error.title}: ${error.message}` : String(error);
  box.hidden = false;
}

function itemUrl(item, tail = "") {
  return `/review/items/${encodeURIComponent(state.model)}/${item.sha256}${tail}`;
}

function fillModels(models) {
  const names = Object.keys(models);
  if (state.model && !names.includes(state.model)) {
    names.push(state.model);
  }
  const select = $("model");
  select.replaceChildren(
    ...names.map((name) => {
      const option = new Option(`${name} (${models[name] || 0} waiting)`, name);
      option.selected = name === state.model;
      return option;
    }),
  );
  $("model-field").hidden = names.length < 2;
}

function fillLabels() {
  $("labels").replaceChildren(...state.labels.map((label) => new Option(label, label)));
}

// Ask the service what waits now (other reviewers, other workers may have acted), then show one.
async function load() {
  const listed = await request(`/review/items${query({ model: state.model })}`);
  state.model = listed.model;
  state.labels = listed.labels;
  state.items = listed.items;
  fillModels(listed.models);
  fillLabels();
  const others = Object.values(listed.models).reduce((sum, count) => sum + count, 0) - listed.waiting;
  const more = others > 0 ? `, ${others} for other models` : "";
  $("left").textContent = state.model
    ? `${listed.waiting} image${listed.waiting === 1 ? "" : "s"} left for ${state.model}${more}`
    : "Nothing left to review";
  if (state.model && !state.labels.length && state.items.length) {
    showError(new ProblemError("Model not served", `${state.model} is not served now, so its labels are unknown; its images can only be discarded`, 404));
  }
  showNext();
}

function showNext() {
  const present = new Set(state.items.map((item) => item.sha256));
  state.skipped = new Set([...state.skipped].filter((sha) => present.has(sha)));
  let next = state.items.find((item) => !state.skipped.has(item.sha256));
  if (!next && state.items.length) {
    state.skipped.clear(); // every one was skipped: round again
    next = state.items[0];
  }
  show(next || null);
}

function show(item) {
  state.current = item;
  $("item").hidden = !item;
  $("done").hidden = Boolean(item);
  if (!item) {
    return;
  }
  $("item").dataset.sha = item.sha256;
  const top = item.predictions[0];
  const picture = $("picture");
  picture.alt = `The captured image the model called ${top.label} (${percent(top.probability)})`;
  picture.src = itemUrl(item, "/image");
  $("facts").textContent =
    `Captured ${item.time} by ${state.model} v${item.version} (${item.reason.replace("_", " ")}).`;
  $("guesses").replaceChildren(
    ...item.predictions.slice(0, GUESSES).map((guess, index) => {
      const button = document.createElement("button");
      button.type = "button";
      button.className = index === 0 ? "guess top" : "guess";
      button.textContent = `${index + 1}. ${guess.label} `;
      const value = document.createElement("span");
      value.className = "dim";
      value.textContent = percent(guess.probability);
      button.append(value);
      button.setAttribute("aria-keyshortcuts", String(index + 1));
      button.addEventListener("click", () => act("label", guess.label));
      return button;
    }),
  );
  $("confirm").textContent = `Confirm “${top.label}”`;
  $("label").value = "";
  loadHeatmap(item);
  $("item-title").focus();
}

async function loadHeatmap(item) {
  const overlay = $("overlay");
  const caption = $("overlay-caption");
  overlay.hidden = true;
  caption.textContent = "Grad-CAM: where the network looked…";
  try {
    const answer = await request(itemUrl(item, "/heatmap"));
    if (state.current !== item) {
      return; // the reviewer moved on meanwhile
    }
    const heatmap = answer.heatmap;
    const label = state.labels[heatmap.class_index] ?? heatmap.class_index;
    overlay.src = `data:image/png;base64,${heatmap.png}`;
    overlay.alt = `Grad-CAM of class ${label} at layer ${heatmap.layer}, drawn over the image`;
    overlay.hidden = false;
    caption.textContent = `Grad-CAM of “${label}” at ${heatmap.layer} (${answer.model.name} v${answer.model.version})`;
  } catch (error) {
    if (state.current === item) {
      caption.textContent = `No heatmap: ${error.message}`;
    }
  }
}

async function act(action, label = null) {
  const item = state.current;
  if (!item || state.busy) {
    return;
  }
  state.busy = true;
  showError(null);
  try {
    const body = action === "label" ? { action, label } : { action };
    await request(itemUrl(item), {
      method: "POST",
      headers: { "Content-Type": "application/json", Accept: "application/json" },
      body: JSON.stringify(body),
    });
    $("status").textContent = action === "label" ? `Filed under “${label}”.` : "Discarded.";
  } catch (error) {
    showError(error);
  } finally {
    state.busy = false;
  }
  try {
    await load(); // also after a failure: someone else may have reviewed it
  } catch (error) {
    showError(error);
  }
}

function skip() {
  if (!state.current) {
    return;
  }
  state.skipped.add(state.current.sha256);
  $("status").textContent = "Skipped; it comes back once the others are done.";
  showNext();
}

function confirmTop() {
  if (state.current) {
    act("label", state.current.predictions[0].label);
  }
}

function onKey(event) {
  if (event.ctrlKey || event.metaKey || event.altKey || !state.current) {
    return;
  }
  const target = event.target;
  const typing = target instanceof HTMLInputElement || target instanceof HTMLSelectElement;
  // Enter on a button or link is that control's own click; in the field, the form's submit
  if (typing || (event.key === "Enter" && target.closest("button, a, summary"))) {
    return;
  }
  const key = event.key.toLowerCase();
  const guess = Number.parseInt(key, 10);
  if (key === "enter") {
    confirmTop();
  } else if (guess >= 1 && guess <= Math.min(GUESSES, state.current.predictions.length)) {
    act("label", state.current.predictions[guess - 1].label);
  } else if (key === "s") {
    skip();
  } else if (key === "d") {
    act("discard");
  } else {
    return;
  }
  event.preventDefault();
}

function start() {
  $("label-form").addEventListener("submit", (event) => {
    event.preventDefault();
    const typed = $("label").value.trim();
    if (typed) {
      act("label", typed);
    } else {
      confirmTop();
    }
  });
  $("confirm").addEventListener("click", confirmTop);
  $("skip").addEventListener("click", skip);
  $("discard").addEventListener("click", () => act("discard"));
  $("model").addEventListener("change", (event) => {
    state.model = event.target.value;
    state.skipped.clear();
    load().catch(showError);
  });
  $("picture").addEventListener("load", (event) => {
    // tiny pictures (28x28 digits) are shown large, pixel by pixel; photos as they are
    event.target.classList.toggle("tiny", event.target.naturalWidth < 256);
  });
  document.addEventListener("keydown", onKey);
  load().catch((error) => {
    $("left").textContent = "";
    showError(error);
  });
}

start();
