// Pictures of numbers: colour scales and grids painted on canvases, pixel for value.

export function diverging(t) {
  // t in -1..1: blue for negative weights, white for zero, red for positive
  const [r, g, b] = t < 0 ? [33, 102, 172] : [178, 24, 43];
  const a = Math.min(Math.abs(t), 1);
  return [255 + (r - 255) * a, 255 + (g - 255) * a, 255 + (b - 255) * a];
}

export function heat(t) {
  // t in 0..1: black, red, orange, pale yellow
  const stops = [[0, 0, 0], [170, 30, 30], [245, 140, 30], [255, 245, 190]];
  const x = Math.min(Math.max(t, 0), 1) * (stops.length - 1);
  const i = Math.min(Math.floor(x), stops.length - 2);
  const f = x - i;
  return stops[i].map((c, k) => c + (stops[i + 1][k] - c) * f);
}

export function grey(t) {
  const v = Math.min(Math.max(t, 0), 1) * 255;
  return [v, v, v];
}

export function range(values, start, length) {
  let low = Infinity;
  let high = -Infinity;
  for (let i = start; i < start + length; i += 1) {
    low = Math.min(low, values[i]);
    high = Math.max(high, values[i]);
  }
  return [low, high];
}

// Paint an h x w grid: colour(index) -> [r, g, b] for each pixel, row by row.
export function paint(canvas, height, width, colour) {
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
export function enlarge(target, source) {
  const context = target.getContext("2d");
  context.imageSmoothingEnabled = false;
  context.clearRect(0, 0, target.width, target.height);
  context.drawImage(source, 0, 0, target.width, target.height);
  return context;
}
