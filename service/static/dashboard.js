// The live dashboard: scrape /metrics every few seconds and chart what changed in between.

import { Chart } from "./charts.js";
import { bucketIncrease, parseMetrics, perBucket, quantile, Scrape } from "./metrics.js";

const $ = (id) => document.getElementById(id);
const settings = new URLSearchParams(location.search);
const EVERY = Math.min(Math.max(Number(settings.get("every")) || 2, 1), 60); // seconds
const WINDOW = Math.min(Math.max(Number(settings.get("minutes")) || 5, 1), 60) * 60; // seconds
const ms = (seconds) => (seconds === null ? null : seconds * 1000);

const charts = {
  rate: new Chart($("chart-rate"), [
    { key: "rate", name: "requests", colour: "#1f5fbf" },
    { key: "images", name: "images", colour: "#2e8b57" },
    { key: "rate4xx", name: "4xx", colour: "#d98c00" },
    { key: "rate5xx", name: "5xx", colour: "#c0392b" },
  ], "/s"),
  latency: new Chart($("chart-latency"), [
    { key: "p50", name: "p50", colour: "#2e8b57" },
    { key: "p95", name: "p95", colour: "#d98c00" },
    { key: "p99", name: "p99", colour: "#c0392b" },
  ], "ms"),
  stages: new Chart($("chart-stages"), [
    { key: "queue", name: "queue wait", colour: "#8e44ad" },
    { key: "inference", name: "inference (per batch)", colour: "#1f5fbf" },
    { key: "preprocess", name: "decode + preprocess", colour: "#7f8c8d" },
  ], "ms", (v) => v.toFixed(2)),
  batch: new Chart($("chart-batch"), [{ key: "batch", name: "mean batch size", colour: "#1f5fbf" }], "images"),
  sizes: new Chart($("chart-sizes"), [{ key: "sizes", name: "forward passes by batch size", colour: "#1f5fbf" }], ""),
  queue: new Chart($("chart-queue"), [
    { key: "depth", name: "queue depth", colour: "#8e44ad" },
    { key: "inflight", name: "in flight", colour: "#1f5fbf" },
  ], "", (v) => v.toFixed(0)),
  cache: new Chart($("chart-cache"), [
    { key: "hits", name: "hits", colour: "#2e8b57" },
    { key: "misses", name: "misses", colour: "#7f8c8d" },
  ], "/s"),
  capture: new Chart($("chart-capture"), [
    { key: "captured", name: "kept", colour: "#2e8b57" },
    { key: "dropped", name: "dropped", colour: "#c0392b" },
  ], "/min"),
  shadow: new Chart($("chart-shadow"), [
    { key: "agreement", name: "top-1 agreement", colour: "#2e8b57" },
  ], "%", (v) => v.toFixed(1)),
  shadowLatency: new Chart($("chart-shadow-latency"), [
    { key: "shadowP50", name: "candidate p50", colour: "#8e44ad" },
    { key: "shadowP95", name: "candidate p95", colour: "#c0392b" },
    { key: "inference", name: "serving inference p95", colour: "#1f5fbf" },
  ], "ms", (v) => v.toFixed(2)),
  errors: new Chart($("chart-errors"), [
    { key: "errors5xx", name: "5xx", colour: "#c0392b" },
    { key: "errors4xx", name: "4xx", colour: "#d98c00" },
  ], "%", (v) => v.toFixed(2)),
};

const history = []; // scrapes in the window, oldest first
const points = []; // one per interval between consecutive scrapes

function increase(before, after, name, where) {
  return Math.max(after.sum(name, where) - before.sum(name, where), 0);
}

function percentile(q, before, after, name) {
  const value = quantile(q, bucketIncrease(before.buckets(name), after.buckets(name)));
  return ms(value);
}

// What happened between two scrapes, as rates, percentiles and ratios.
function interval(a, b) {
  const seconds = b.time - a.time;
  const status = (prefix) => (labels) => String(labels.status).startsWith(prefix);
  const requests = increase(a, b, "convserve_requests_total");
  const byClass = (prefix) => increase(a, b, "convserve_requests_total", status(prefix));
  const passes = increase(a, b, "convserve_batch_size_count");
  const lookups = (result) => increase(a, b, "convserve_cache_lookups_total", (labels) => labels.result === result);
  const hits = lookups("hit");
  const looked = hits + lookups("miss");
  const shadowed = increase(a, b, "convserve_shadow_images_total");
  return {
    time: b.time,
    rate: requests / seconds,
    rate4xx: byClass("4") / seconds,
    rate5xx: byClass("5") / seconds,
    errors5xx: requests ? (100 * byClass("5")) / requests : null,
    errors4xx: requests ? (100 * byClass("4")) / requests : null,
    p50: percentile(0.5, a, b, "convserve_request_duration_seconds"),
    p95: percentile(0.95, a, b, "convserve_request_duration_seconds"),
    p99: percentile(0.99, a, b, "convserve_request_duration_seconds"),
    queue: percentile(0.95, a, b, "convserve_queue_wait_seconds"),
    inference: percentile(0.95, a, b, "convserve_inference_seconds"),
    preprocess: percentile(0.95, a, b, "convserve_preprocess_seconds"),
    batch: passes ? increase(a, b, "convserve_batch_size_sum") / passes : null,
    images: increase(a, b, "convserve_images_total") / seconds,
    depth: b.sum("convserve_queue_depth"),
    inflight: b.sum("convserve_inflight_requests"),
    hits: hits / seconds,
    misses: (looked - hits) / seconds,
    hitRate: looked ? (100 * hits) / looked : null,
    captured: (60 * increase(a, b, "convserve_captures_total")) / seconds,
    dropped: (60 * increase(a, b, "convserve_capture_dropped_total")) / seconds,
    capturedTotal: b.sum("convserve_captures_total"),
    agreement: shadowed ? (100 * increase(a, b, "convserve_shadow_agreed_total")) / shadowed : null,
    shadowP50: percentile(0.5, a, b, "convserve_shadow_seconds"),
    shadowP95: percentile(0.95, a, b, "convserve_shadow_seconds"),
    rollouts: b.samples
      .filter((s) => s.name === "convserve_rollout_share" && s.value > 0)
      .map((s) => `${s.labels.model} v${s.labels.version}: ${s.labels.mode} ${Math.round(100 * s.value)}%`),
  };
}

// Forward passes per batch-size bucket over the whole window: "1", "2", "3-4", "5-8", ...
function batchSizes() {
  const first = history[0];
  const last = history[history.length - 1];
  const counts = perBucket(bucketIncrease(first.buckets("convserve_batch_size"), last.buckets("convserve_batch_size")));
  const used = counts.filter(([le, n]) => n > 0 && le !== Infinity).map(([le]) => le);
  const shown = Math.max(32, ...used);
  let lower = 0;
  const bars = [];
  for (const [le, n] of counts) {
    if (le === Infinity) {
      if (n > 0) {
        bars.push([`>${lower}`, n]);
      }
      break;
    }
    if (le <= shown) {
      bars.push([le - lower === 1 ? String(le) : `${lower + 1}-${le}`, n]);
    }
    lower = le;
  }
  return bars;
}

const show = (value, digits, unit = "") => (value === null || value === undefined ? "–" : `${value.toFixed(digits)}${unit}`);

function render() {
  const now = history[history.length - 1].time;
  // the time axis grows with the history this page has, from one minute up to the window
  const span = Math.min(Math.max(now - history[0].time, 60), WINDOW);
  for (const key of ["rate", "latency", "stages", "batch", "queue", "cache", "capture", "shadow", "shadowLatency", "errors"]) {
    charts[key].lines(points, now, span);
  }
  charts.sizes.bars(batchSizes());
  const latest = points[points.length - 1];
  $("stat-rate").textContent = show(latest.rate, 1);
  $("stat-p95").textContent = show(latest.p95, 1, " ms");
  $("stat-errors").textContent = show(latest.errors5xx, 2, "%");
  $("stat-batch").textContent = show(latest.batch, 1);
  $("stat-queue").textContent = show(latest.depth, 0);
  $("stat-inflight").textContent = show(latest.inflight, 0);
  $("stat-cache").textContent = show(latest.hitRate, 0, "%");
  $("stat-captured").textContent = show(latest.capturedTotal, 0);
  $("stat-rollout").textContent = latest.rollouts.join("; ") || "none";
  $("stat-agreement").textContent = show(latest.agreement, 1, "%");
  $("updated").textContent = `Updated ${new Date(now * 1000).toLocaleTimeString()}; ${points.length} readings in the window.`;
  $("updated").dataset.readings = String(points.length);
}

function fillModels(samples) {
  const select = $("model-filter");
  const known = new Set([...select.options].map((o) => o.value));
  for (const s of samples) {
    if (s.name === "convserve_model_info" && s.value === 1 && !known.has(s.labels.model)) {
      select.append(new Option(s.labels.model, s.labels.model));
      known.add(s.labels.model);
    }
  }
}

async function tick() {
  try {
    const response = await fetch("/metrics", { headers: { Accept: "text/plain" } });
    if (!response.ok) {
      throw new Error(`GET /metrics answered ${response.status} ${response.statusText}`);
    }
    const samples = parseMetrics(await response.text());
    fillModels(samples);
    $("error").hidden = true;
    history.push(new Scrape(samples, Date.now() / 1000, $("model-filter").value));
    if (history.length >= 2) {
      points.push(interval(history[history.length - 2], history[history.length - 1]));
    }
    const start = history[history.length - 1].time - WINDOW;
    while (history.length > 2 && history[1].time <= start) {
      history.shift();
    }
    while (points.length && points[0].time < start) {
      points.shift();
    }
    if (points.length) {
      render();
    }
  } catch (error) {
    $("error").textContent = `Could not read the metrics: ${error.message}. Retrying every ${EVERY} s.`;
    $("error").hidden = false;
  }
}

$("every").textContent = String(EVERY);
$("window").textContent = String(WINDOW / 60);
$("model-filter").addEventListener("change", () => {
  history.length = 0; // a new filter starts a new history
  points.length = 0;
  $("updated").textContent = "Waiting for the first two readings…";
  tick();
});
tick();
setInterval(tick, EVERY * 1000);
