// One output value of a convolution taken apart: the arithmetic, and the tables that show it.

export const fixed = (value, digits = 3) => (Object.is(value, -0) ? 0 : value).toFixed(digits);
const FULL_CHANNELS = 3; // input channels shown as full tables; the rest fold into a list

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

// Everything one step-through shows, as elements: the tables per input channel (the first few
// in full, the rest folded), then the sum, the bias, the service's value and the activation.
export function stepView(m, step) {
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
  return parts;
}
