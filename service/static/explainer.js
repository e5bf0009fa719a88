// The convolution explainer: a conv layer's kernels, the feature maps they make of the image,
// and one output value redone step by step, all from POST /models/{name}/layers/{layer}/maps.

import { decodeTensor, postImage, query } from "./api.js";

const $ = (id) => document.getElementById(id);
const MAX_TILES = 128;
const FULL_CHANNELS = 3; // input channels shown as full tables; the rest fold into a list
const fixed = (value, digits = 3) => (Object.is(value, -0) ? 0 : value).toFixed(digits);

// ---- colours -------------------------------------------------------------------------------

function diverging(t) {
  // t in -1..1: blue for negative weights, white for zero, red for positive
  const [r, g, b] = t < 0 ? [33, 102, 172] : [178, 24, 43];
  const a = Math.min(Math.abs(t), 1);
  return [255 + (r - 255) * a, 255 + (g - 255) * a, 255 + (b - 255) * a];
}

function heat(t) {
  // t in 0..1: black, red, orange, pale yellow
  const stops = [[0, 0, 0], [170, 30, 30], [245, 140, 30], [255, 245, 190]];
  const x = Math.min(Math.max(t, 0), 1) * (stops.length - 1);
  const i = Math.min(Math.floor(x), stops.length - 2);
  const f = x - i;
  return stops[i].map((c, k) => c + (stops[i + 1][k] - c) * f);
}

function grey(t) {
  const v = Math.min(Math.max(t, 0), 1) * 255;
  return [v, v, v];
}

function range(values, start, length) {
  let low = Infinity;
  let high = -Infinity;
  for (let i = start; i < start + length; i += 1) {
    low = Math.min(low, values[i]);
    high = Math.max(high, values[i]);
  }
  return [low, high];
}

// Paint an h x w grid: colour(index) -> [r, g, b] for each pixel, row by row.
function paint(canvas, height, width, colour) {
  canvas.width = width;
  canvas.height = height;
  const context = canvas.getContext("2d");
  const image = context.createImageData(width, height);
  for (let p = 0; p < width * height; p += 1) {
    const [r, g, b] = colour(p);
    image.data.set([r, g, b, 255], p * 4);
  }
  context.putImageData(image, 0, 0);
}

// Draw a small canvas enlarged onto `target` without smoothing, for pixels that can be seen.
function enlarge(target, source) {
  const context = target.getContext("2d");
  context.imageSmoothingEnabled = false;
  context.clearRect(0, 0, target.width, target.height);
  context.drawImage(source, 0, 0, target.width, target.height);
  return context;
}

// ---- the explainer ---------------------------------------------------------------------------

export class Explainer {
  constructor(showError) {
    this.showError = showError;
    this.maps = null; // decoded answer of the maps route
    this.image = null;
    this.where = null;
    this.channel = 0;
    this.row = 0;
    this.col = 0;
    $("conv-layer").addEventListener("change", () => this.fetch());
    for (const radio of document.querySelectorAll('input[name="stage"]')) {
      radio.addEventListener("change", () => this.drawMaps());
    }
    for (const id of ["step-channel", "step-row", "step-col"]) {
      $(id).addEventListener("change", () => this.pick(
        Number($("step-channel").value), Number($("step-row").value), Number($("step-col").value),
      ));
    }
    const map = $("step-map");
    map.addEventListener("click", (event) => {
      const box = map.getBoundingClientRect();
      const [, h, w] = this.maps.pre.shape;
      const col = Math.floor(((event.clientX - box.left) / box.width) * w);
      const row = Math.floor(((event.clientY - box.top) / box.height) * h);
      this.pick(this.channel, row, col);
    });
    map.addEventListener("keydown", (event) => {
      const moves = { ArrowLeft: [0, -1], ArrowRight: [0, 1], ArrowUp: [-1, 0], ArrowDown: [1, 0] };
      if (this.maps && event.key in moves) {
        event.preventDefault();
        const [dy, dx] = moves[event.key];
        this.pick(this.channel, this.row + dy, this.col + dx);
      }
    });
  }

  setModel(card) {
    const layers = card.heatmap_layers.filter((l) => l.kind === "conv");
    $("conv-layer").replaceChildren(...layers.map((l) => new Option(l.name, l.name)));
    this.maps = null;
    $("explainer").hidden = true;
  }

  async load(image, where) {
    this.image = image;
    this.where = where;
    await this.fetch();
  }

  async fetch() {
    const layer = $("conv-layer").value;
    if (!this.image || !layer) {
      return;
    }
    const { model, version } = this.where;
    const url = `/models/${encodeURIComponent(model)}/layers/${encodeURIComponent(layer)}/maps${query({ version })}`;
    const asked = this.image;
    let answer;
    try {
      answer = await postImage(url, asked);
    } catch (error) {
      this.showError(error);
      return;
    }
    if (asked !== this.image || layer !== $("conv-layer").value) {
      return; // a newer image or layer was asked for meanwhile
    }
    const maps = { ...answer };
    for (const key of ["input", "weight", "pre", "post"]) {
      maps[key] = decodeTensor(answer[key]);
    }
    maps.bias = answer.bias ? decodeTensor(answer.bias) : null;
    this.maps = maps;
    this.channel = 0;
    this.row = 0;
    this.col = 0;
    $("explainer").hidden = false;
    this.describe();
    this.drawKernels();
    this.drawMaps();
    // start on the strongest response: the most interesting value to take apart
    const [channels, h, w] = maps.post.shape;
    let best = 0;
    for (let i = 1; i < maps.post.values.length; i += 1) {
      if (maps.post.values[i] > maps.post.values[best]) {
        best = i;
      }
    }
    this.pick(Math.floor(best / (h * w)) % channels, Math.floor(best / w) % h, best % w);
  }

  describe() {
    const m = this.maps;
    const [cout, cg, kh, kw] = m.weight.shape;
    const [, h, w] = m.pre.shape;
    const [cin, ih, iw] = m.input.shape;
    const after = m.after.map((s) => `${s.name} (${s.type})`).join(", ") || "nothing";
    $("conv-facts").textContent =
      `${m.layer}: ${cout} kernels of ${cg}×${kh}×${kw}, stride ${m.stride.join("×")}, ` +
      `padding ${m.padding.join("×")}, over a ${cin}×${ih}×${iw} input, giving ${cout} maps of ` +
      `${h}×${w}; then ${after}.`;
    const how = cg === 1 ? "" : cg === 3 ? " Three input channels are drawn as colour." : ` Each is the mean over its ${cg} input channels.`;
    $("kernels-help").textContent =
      `The ${cout} learned ${kh}×${kw} kernels: red weights add, blue ones subtract, white is zero.${how}`;
  }

  tiles(box, count, make) {
    const shown = Math.min(count, MAX_TILES);
    const tiles = [];
    for (let c = 0; c < shown; c += 1) {
      const button = document.createElement("button");
      button.type = "button";
      button.className = "tile";
      button.dataset.channel = String(c);
      const canvas = document.createElement("canvas");
      make(canvas, c);
      const name = document.createElement("span");
      name.textContent = String(c);
      button.append(canvas, name);
      button.addEventListener("click", () => this.pick(c, this.row, this.col));
      tiles.push(button);
    }
    box.replaceChildren(...tiles);
    if (count > shown) {
      const more = document.createElement("p");
      more.className = "help";
      more.textContent = `The first ${shown} of ${count}; pick any with the Map field below.`;
      box.append(more);
    }
  }

  drawKernels() {
    const { values, shape } = this.maps.weight;
    const [cout, cg, kh, kw] = shape;
    const [low, high] = range(values, 0, values.length);
    const scale = Math.max(Math.abs(low), Math.abs(high)) || 1;
    const size = kh * kw;
    this.tiles($("kernels"), cout, (canvas, c) => {
      const base = c * cg * size;
      paint(canvas, kh, kw, (p) => {
        if (cg === 3) {
          return [0, 1, 2].map((k) => ((values[base + k * size + p] - low) / (high - low || 1)) * 255);
        }
        let sum = 0;
        for (let k = 0; k < cg; k += 1) {
          sum += values[base + k * size + p];
        }
        return diverging(sum / cg / scale);
      });
      canvas.setAttribute("aria-hidden", "true");
    });
    for (const tile of $("kernels").querySelectorAll(".tile")) {
      tile.setAttribute("aria-label", `Kernel ${tile.dataset.channel}: show its map below`);
    }
  }

  stage() {
    return document.querySelector('input[name="stage"]:checked').value;
  }

  // One map as a canvas: after the activation in heat colours, before it in blue and red.
  paintMap(canvas, c) {
    const tensor = this.maps[this.stage()];
    const [, h, w] = tensor.shape;
    const start = c * h * w;
    const [low, high] = range(tensor.values, start, h * w);
    if (this.stage() === "pre") {
      const scale = Math.max(Math.abs(low), Math.abs(high)) || 1;
      paint(canvas, h, w, (p) => diverging(tensor.values[start + p] / scale));
    } else {
      paint(canvas, h, w, (p) => heat(tensor.values[start + p] / (high || 1)));
    }
  }

  drawMaps() {
    if (!this.maps) {
      return;
    }
    this.tiles($("maps"), this.maps.pre.shape[0], (canvas, c) => {
      this.paintMap(canvas, c);
      canvas.setAttribute("aria-hidden", "true");
    });
    for (const tile of $("maps").querySelectorAll(".tile")) {
      tile.setAttribute("aria-label", `Map ${tile.dataset.channel}: step through one of its values`);
    }
    this.mark();
    this.drawStepViews();
  }

  mark() {
    for (const tile of document.querySelectorAll("#kernels .tile, #maps .tile")) {
      tile.setAttribute("aria-pressed", String(Number(tile.dataset.channel) === this.channel));
    }
  }

  pick(channel, row, col) {
    if (!this.maps) {
      return;
    }
    const [channels, h, w] = this.maps.pre.shape;
    const clamp = (v, n) => Math.min(Math.max(Number.isFinite(v) ? Math.trunc(v) : 0, 0), n - 1);
    this.channel = clamp(channel, channels);
    this.row = clamp(row, h);
    this.col = clamp(col, w);
    $("step-channel").max = String(channels - 1);
    $("step-row").max = String(h - 1);
    $("step-col").max = String(w - 1);
    $("step-channel").value = String(this.channel);
    $("step-row").value = String(this.row);
    $("step-col").value = String(this.col);
    this.mark();
    this.drawStepViews();
    this.renderStep(stepThrough(this.maps, this.channel, this.row, this.col));
  }

  drawStepViews() {
    const m = this.maps;
    const [cin, ih, iw] = m.input.shape;
    const [cout, cg, kh, kw] = m.weight.shape;
    const first = Math.floor(this.channel / (cout / m.groups)) * cg;
    // the input: colour when it has three channels, else the mean over this kernel's channels
    const source = document.createElement("canvas");
    const plane = ih * iw;
    const [low, high] = range(m.input.values, 0, m.input.values.length);
    paint(source, ih, iw, (p) => {
      if (cin === 3) {
        return [0, 1, 2].map((k) => ((m.input.values[k * plane + p] - low) / (high - low || 1)) * 255);
      }
      let sum = 0;
      for (let k = first; k < first + cg; k += 1) {
        sum += m.input.values[k * plane + p];
      }
      return grey((sum / cg - low) / (high - low || 1));
    });
    const inputView = $("step-input");
    const context = enlarge(inputView, source);
    const sx = inputView.width / iw;
    const sy = inputView.height / ih;
    const top = this.row * m.stride[0] - m.padding[0];
    const left = this.col * m.stride[1] - m.padding[1];
    context.strokeStyle = "#2a7fff";
    context.lineWidth = 2;
    context.strokeRect(left * sx, top * sy, ((kw - 1) * m.dilation[1] + 1) * sx, ((kh - 1) * m.dilation[0] + 1) * sy);
    $("step-input-caption").textContent =
      `What ${m.layer} received (${cin}×${ih}×${iw}); the outline is the ${kh}×${kw} patch under the kernel.`;

    const mapSource = document.createElement("canvas");
    this.paintMap(mapSource, this.channel);
    const mapView = $("step-map");
    const mapContext = enlarge(mapView, mapSource);
    const [, h, w] = m.pre.shape;
    mapContext.strokeStyle = "#2a7fff";
    mapContext.lineWidth = 2;
    mapContext.strokeRect((this.col * mapView.width) / w, (this.row * mapView.height) / h, mapView.width / w, mapView.height / h);
    mapView.setAttribute(
      "aria-label",
      `Map ${this.channel}, position row ${this.row}, column ${this.col}; arrow keys move it`,
    );
  }

  renderStep(step) {
    const m = this.maps;
    const box = $("step");
    const parts = [];
    const heading = document.createElement("p");
    heading.textContent =
      `Map ${step.channel} at row ${step.row}, column ${step.col}: the kernel's ` +
      `${step.inputs.length}×${m.weight.shape[2]}×${m.weight.shape[3]} weights times the patch under it.`;
    parts.push(heading);
    const full = step.inputs.slice(0, FULL_CHANNELS).map((input) => channelTables(input));
    parts.push(...full);
    if (step.inputs.length > FULL_CHANNELS) {
      const more = document.createElement("details");
      const summary = document.createElement("summary");
      summary.textContent = `All ${step.inputs.length} input channels`;
      const list = document.createElement("ol");
      list.start = 0;
      for (const input of step.inputs) {
        const item = document.createElement("li");
        item.value = input.channel;
        item.textContent = `channel ${input.channel}: products add up to ${fixed(input.sum, 4)}`;
        list.append(item);
      }
      more.append(summary, list);
      for (const input of step.inputs.slice(FULL_CHANNELS)) {
        more.append(channelTables(input));
      }
      parts.push(more);
    }
    const rows = [
      ["step-sum", `Sum of the ${step.count} products`, step.sum],
      ["step-bias", "+ bias", step.bias],
      ["step-pre", "= output before the activation", step.sum + step.bias],
      ["step-map-value", "the service's map holds", step.pre],
    ];
    const after = m.after.map((s) => s.name).join(" then ");
    const relu = m.after.length === 1 && m.after[0].type === "ReLU";
    rows.push([
      "step-post",
      relu ? `ReLU: max(0, ${fixed(step.sum + step.bias, 4)})` : m.after.length ? `after ${after}` : "no activation",
      step.post,
    ]);
    const list = document.createElement("dl");
    list.className = "sums";
    for (const [id, text, value] of rows) {
      const term = document.createElement("dt");
      term.textContent = text;
      const output = document.createElement("dd");
      output.id = id;
      output.dataset.value = String(value);
      output.textContent = fixed(value, 4);
      list.append(term, output);
    }
    parts.push(list);
    box.replaceChildren(...parts);
  }
}

// ---- arithmetic --------------------------------------------------------------------------------

// Where a position outside the input reads from, per torch's padding modes (-1: a zero).
function source(index, size, mode) {
  if (index >= 0 && index < size) {
    return index;
  }
  if (mode === "replicate") {
    return Math.min(Math.max(index, 0), size - 1);
  }
  if (mode === "reflect") {
    return index < 0 ? -index : 2 * (size - 1) - index;
  }
  if (mode === "circular") {
    return ((index % size) + size) % size;
  }
  return -1;
}

// Redo pre[c, row, col] from the layer's input, weights and bias, padding as the layer pads.
export function stepThrough(m, channel, row, col) {
  const [cin, ih, iw] = m.input.shape;
  const [cout, cg, kh, kw] = m.weight.shape;
  const [, h, w] = m.pre.shape;
  const first = Math.floor(channel / (cout / m.groups)) * cg;
  const inputs = [];
  let sum = 0;
  for (let k = 0; k < cg; k += 1) {
    const patch = [];
    const weights = [];
    let partial = 0;
    for (let i = 0; i < kh; i += 1) {
      for (let j = 0; j < kw; j += 1) {
        const y = row * m.stride[0] - m.padding[0] + i * m.dilation[0];
        const x = col * m.stride[1] - m.padding[1] + j * m.dilation[1];
        const inside = y >= 0 && y < ih && x >= 0 && x < iw;
        const [sy, sx] = [source(y, ih, m.padding_mode), source(x, iw, m.padding_mode)];
        const value = sy < 0 || sx < 0 ? 0 : m.input.values[((first + k) * ih + sy) * iw + sx];
        const weight = m.weight.values[((channel * cg + k) * kh + i) * kw + j];
        patch.push({ value, inside });
        weights.push(weight);
        partial += value * weight;
      }
    }
    sum += partial;
    inputs.push({ channel: first + k, patch, weights, sum: partial, kh, kw, mode: m.padding_mode });
  }
  const at = (channel * h + row) * w + col;
  return {
    channel,
    row,
    col,
    inputs,
    count: cg * kh * kw,
    sum,
    bias: m.bias ? m.bias.values[channel] : 0,
    pre: m.pre.values[at],
    post: m.post.values[at],
    cin,
  };
}

function grid(title, input, text, className) {
  const table = document.createElement("table");
  table.className = `grid ${className}`;
  const caption = document.createElement("caption");
  caption.textContent = title;
  table.append(caption);
  const body = document.createElement("tbody");
  for (let i = 0; i < input.kh; i += 1) {
    const line = document.createElement("tr");
    for (let j = 0; j < input.kw; j += 1) {
      const index = i * input.kw + j;
      const cell = document.createElement("td");
      cell.textContent = text(index);
      if (!input.patch[index].inside) {
        cell.className = "pad";
        cell.title = `padding (${input.mode})`;
      }
      line.append(cell);
    }
    body.append(line);
  }
  table.append(body);
  return table;
}

function channelTables(input) {
  const group = document.createElement("div");
  group.className = "step-channel";
  group.append(
    grid(`patch, input channel ${input.channel}`, input, (i) => fixed(input.patch[i].value), "patch"),
    grid("× weights", input, (i) => fixed(input.weights[i]), "weights"),
    grid("= products", input, (i) => fixed(input.patch[i].value * input.weights[i]), "products"),
  );
  const sum = document.createElement("p");
  sum.className = "partial";
  sum.textContent = `sum: ${fixed(input.sum, 4)}`;
  group.append(sum);
  return group;
}
