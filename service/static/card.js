// The model card beside the results: facts, and the layer table the service computed.

const number = (n) => n.toLocaleString("en-US");
const shape = (dims) => dims.join("×");

function cell(tag, text, scope) {
  const element = document.createElement(tag);
  element.textContent = text;
  if (scope) {
    element.scope = scope;
  }
  return element;
}

function geometry(row) {
  if (!row.kernel) {
    return "";
  }
  const pair = (values) => (values[0] === values[1] ? String(values[0]) : values.join("×"));
  return `${pair(row.kernel)} / ${pair(row.stride)} / ${pair(row.padding)}`;
}

export function renderCard(card) {
  const facts = [
    ["Model", `${card.name} v${card.version}`],
    ["Architecture", card.description ? `${card.architecture}: ${card.description}` : card.architecture],
    ["Input", `${shape([card.input.channels, card.input.height, card.input.width])}, ${card.input.resize}`],
    ["Classes", String(card.labels.length)],
    ["Parameters", number(card.anatomy.total_params)],
    ["Mult-adds per image", number(card.anatomy.total_macs)],
    ["Device", card.device],
  ];
  if (card.metrics.accuracy !== null && card.metrics.accuracy !== undefined) {
    const where = card.metrics.dataset ? ` on ${card.metrics.dataset}` : "";
    facts.push(["Held-out accuracy", `${(card.metrics.accuracy * 100).toFixed(1)}%${where}`]);
  }
  const list = document.getElementById("card-facts");
  list.replaceChildren(...facts.flatMap(([term, value]) => [cell("dt", term), cell("dd", value)]));

  const table = document.getElementById("card-table");
  const heatmapLayers = new Set(card.heatmap_layers.map((l) => l.name));
  table.tBodies[0].replaceChildren(
    ...card.anatomy.layers.map((row) => {
      const line = document.createElement("tr");
      if (heatmapLayers.has(row.name)) {
        line.className = "conv";
      }
      line.append(
        cell("th", row.name, "row"),
        cell("td", row.type),
        cell("td", geometry(row)),
        cell("td", shape(row.output_shape)),
        cell("td", number(row.params)),
        cell("td", number(row.macs)),
        cell("td", row.receptive_field === null ? "" : `${row.receptive_field}×${row.receptive_field}`),
      );
      return line;
    }),
  );
  const total = document.createElement("tr");
  total.append(
    cell("th", "Total", "row"),
    cell("td", ""),
    cell("td", ""),
    cell("td", shape(card.anatomy.output_shape)),
    cell("td", number(card.anatomy.total_params)),
    cell("td", number(card.anatomy.total_macs)),
    cell("td", ""),
  );
  table.tFoot.replaceChildren(total);
}
