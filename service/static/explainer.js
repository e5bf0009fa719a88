// The convolution explainer: a conv layer's kernels, the feature maps they make of the image,
// and one output value redone step by step, all from POST /models/{name}/layers/{layer}/maps.

import { decodeTensor, postPicture, query } from "./api.js";
import { diverging, enlarge, grey, heat, paint, range } from "./pictures.js";
import { stepThrough, stepView } from "./steps.js";

const $ = (id) => document.getElementById(id);
const MAX_TILES = 128;

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
      answer = await postPicture(url, asked);
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
    $("step").replaceChildren(...stepView(this.maps, stepThrough(this.maps, this.channel, this.row, this.col)));
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
}
