// Plain SVG charts: time lines and bars, with a text legend that carries the latest values
// (the legend is what screen readers get; the drawing is marked as an image).

const SVG = "http://www.w3.org/2000/svg";
const WIDTH = 480;
const HEIGHT = 180;
const PAD = { left: 44, right: 10, top: 10, bottom: 22 };

function element(name, attributes = {}, text = "") {
  const node = document.createElementNS(SVG, name);
  for (const [key, value] of Object.entries(attributes)) {
    node.setAttribute(key, String(value));
  }
  if (text) {
    node.textContent = text;
  }
  return node;
}

// A round upper bound for the y axis: 1, 2, 2.5 or 5 times a power of ten.
export function niceCeiling(value) {
  if (!(value > 0)) {
    return 1;
  }
  const power = 10 ** Math.floor(Math.log10(value));
  for (const step of [1, 2, 2.5, 5, 10]) {
    if (step * power >= value) {
      return step * power;
    }
  }
  return 10 * power;
}

function label(value) {
  if (value === 0) {
    return "0";
  }
  if (Math.abs(value) >= 100) {
    return value.toFixed(0);
  }
  return Number(value.toPrecision(3)).toString();
}

// One chart = one <section>: an <svg> plus a legend list, created once, redrawn on each reading.
export class Chart {
  constructor(section, series, unit, format = (v) => v.toFixed(1)) {
    this.series = series; // [{ key, name, colour }]
    this.unit = unit;
    this.format = format;
    const title = section.querySelector("h3");
    this.svg = element("svg", {
      viewBox: `0 0 ${WIDTH} ${HEIGHT}`,
      role: "img",
      "aria-labelledby": title.id,
    });
    this.legend = document.createElement("ul");
    this.legend.className = "legend";
    section.append(this.svg, this.legend);
  }

  frame(top, axisText) {
    const axis = element("g", { class: "axis" });
    for (let i = 0; i <= 4; i += 1) {
      const y = PAD.top + ((HEIGHT - PAD.top - PAD.bottom) * i) / 4;
      axis.append(element("line", { x1: PAD.left, x2: WIDTH - PAD.right, y1: y, y2: y }));
      axis.append(element("text", { x: PAD.left - 6, y: y + 4, "text-anchor": "end" }, label((top * (4 - i)) / 4)));
    }
    axis.append(...axisText);
    this.svg.replaceChildren(axis);
  }

  legendItems(values) {
    this.legend.replaceChildren(
      ...this.series.map((s) => {
        const item = document.createElement("li");
        const swatch = document.createElement("span");
        swatch.className = "swatch";
        swatch.style.background = s.colour;
        const value = values[s.key];
        item.dataset.key = s.key;
        item.append(swatch, `${s.name}: ${value === null || value === undefined ? "no data" : `${this.format(value)} ${this.unit}`}`);
        return item;
      }),
    );
  }

  // points: [{ time, [key]: value | null }], oldest first; window: seconds shown.
  lines(points, now, window) {
    const values = points.flatMap((p) => this.series.map((s) => p[s.key])).filter((v) => v !== null && v !== undefined);
    const top = niceCeiling(Math.max(...values, 0));
    const x = (t) => PAD.left + ((WIDTH - PAD.left - PAD.right) * (t - (now - window))) / window;
    const y = (v) => HEIGHT - PAD.bottom - ((HEIGHT - PAD.top - PAD.bottom) * v) / top;
    const ticks = [];
    const step = window <= 120 ? 30 : 60; // seconds between ticks
    for (let ago = Math.floor(window / step) * step; ago >= 0; ago -= step) {
      const text = ago === 0 ? "now" : ago % 60 ? `-${ago} s` : `-${ago / 60} min`;
      const anchor = ago === 0 ? "end" : ago === window ? "start" : "middle";
      ticks.push(element("text", { x: x(now - ago), y: HEIGHT - 6, "text-anchor": anchor }, text));
    }
    this.frame(top, ticks);
    for (const s of this.series) {
      let d = "";
      let pen = "M";
      for (const p of points) {
        const v = p[s.key];
        if (v === null || v === undefined) {
          pen = "M"; // a gap: no observations in that interval
          continue;
        }
        d += `${pen}${x(p.time).toFixed(1)},${y(v).toFixed(1)} `;
        pen = "L";
      }
      this.svg.append(element("path", { d: d.trim(), fill: "none", stroke: s.colour, "stroke-width": 2, "data-key": s.key }));
    }
    const latest = points.length ? points[points.length - 1] : {};
    this.legendItems(latest);
  }

  // bars: [[name, value], ...] for one series
  bars(bars) {
    const top = niceCeiling(Math.max(...bars.map(([, v]) => v), 0));
    const width = (WIDTH - PAD.left - PAD.right) / Math.max(bars.length, 1);
    const names = bars.map(([name], i) => element("text", { x: PAD.left + width * (i + 0.5), y: HEIGHT - 6, "text-anchor": "middle" }, name));
    this.frame(top, names);
    const [s] = this.series;
    bars.forEach(([name, value], i) => {
      const h = ((HEIGHT - PAD.top - PAD.bottom) * value) / top;
      const bar = element("rect", {
        x: PAD.left + width * i + 2, y: HEIGHT - PAD.bottom - h, width: Math.max(width - 4, 1), height: h, fill: s.colour, "data-name": name,
      });
      bar.append(element("title", {}, `${name}: ${value}`));
      this.svg.append(bar);
    });
    const described = bars.filter(([, v]) => v > 0).map(([name, v]) => `${name}: ${v}`).join(", ");
    this.legend.replaceChildren(document.createElement("li"));
    this.legend.firstChild.textContent = described ? `${s.name}: ${described}` : `${s.name}: none yet`;
  }
}
