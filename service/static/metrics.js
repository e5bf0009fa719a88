// Reading the Prometheus text format and doing what PromQL's rate() and histogram_quantile()
// do, between two scrapes of /metrics.

const SAMPLE = /^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})?\s+(\S+)/;
const LABEL = /([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"/g;

// Text exposition -> [{ name, labels, value }], comments skipped.
export function parseMetrics(text) {
  const samples = [];
  for (const line of text.split("\n")) {
    if (!line || line.startsWith("#")) {
      continue;
    }
    const match = SAMPLE.exec(line);
    if (!match) {
      continue;
    }
    const labels = {};
    for (const [, key, value] of (match[2] || "").matchAll(LABEL)) {
      labels[key] = value.replace(/\\(.)/g, (_, c) => (c === "n" ? "\n" : c));
    }
    samples.push({ name: match[1], labels, value: Number(match[3]) });
  }
  return samples;
}

// One scrape, summed the way the dashboard reads it. `model` ("" for all) keeps that model's
// samples and those without a model label (in-flight requests are counted for the service).
export class Scrape {
  constructor(samples, time, model = "") {
    this.time = time; // seconds
    this.samples = samples.filter((s) => !model || !("model" in s.labels) || s.labels.model === model);
  }

  sum(name, where = () => true) {
    let total = 0;
    for (const s of this.samples) {
      if (s.name === name && where(s.labels)) {
        total += s.value;
      }
    }
    return total;
  }

  // Cumulative bucket counts of a histogram, summed over its other labels: Map(le -> count).
  buckets(name) {
    const counts = new Map();
    for (const s of this.samples) {
      if (s.name === `${name}_bucket`) {
        const le = s.labels.le === "+Inf" ? Infinity : Number(s.labels.le);
        counts.set(le, (counts.get(le) || 0) + s.value);
      }
    }
    return counts;
  }
}

// Growth of a cumulative bucket map between two scrapes, as sorted [[le, count], ...].
export function bucketIncrease(before, after) {
  return [...after.entries()]
    .map(([le, count]) => [le, Math.max(count - (before.get(le) || 0), 0)])
    .sort((a, b) => a[0] - b[0]);
}

// histogram_quantile(q, ...) over cumulative [[le, count], ...]: linear inside the bucket the
// rank falls in; the +Inf bucket answers the highest finite bound; no observations: null.
export function quantile(q, cumulative) {
  if (!cumulative.length) {
    return null;
  }
  const total = cumulative[cumulative.length - 1][1];
  if (total <= 0) {
    return null;
  }
  const rank = q * total;
  let lower = 0;
  let below = 0;
  for (const [le, count] of cumulative) {
    if (count >= rank) {
      if (le === Infinity) {
        return lower;
      }
      if (count === below) {
        return le;
      }
      return lower + ((le - lower) * (rank - below)) / (count - below);
    }
    lower = le;
    below = count;
  }
  return lower;
}

// Per-bucket (not cumulative) counts from cumulative ones: [[le, count in (previous, le]], ...].
export function perBucket(cumulative) {
  let previous = 0;
  return cumulative.map(([le, count]) => {
    const own = count - previous;
    previous = count;
    return [le, own];
  });
}
