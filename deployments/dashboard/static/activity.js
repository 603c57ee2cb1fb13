// The Activity tab: per model a uPlot chart of the last 15 minutes (requests/s,
// tokens/s and time to first token), updated in place from the live feed, and
// the list of the controller's events, newest first.

import { $, el, fmtClock } from "./util.js";

const WINDOW_S = 15 * 60;
const EVENTS_KEPT = 200;
const HEIGHT = 190;

const buckets = new Map(); // model -> Map(bucket index (t / bucket) -> [requests, tokens, ttft])
const charts = new Map(); // model -> {box, plot}
let bucketSize = 5;
let latest = 0; // server time of the last snapshot
const seenEvents = new Set(); // keys of the events shown, so a reconnect adds no twins

/** Take a snapshot's `activity` and new `events`, at server time `time`. */
export function updateActivity(activity, events, time) {
  latest = time;
  if (activity) mergeSeries(activity);
  drawCharts();
  addEvents(events || []);
}

function mergeSeries(activity) {
  bucketSize = activity.bucket || bucketSize;
  if (activity.full) buckets.clear();
  for (const [model, rows] of Object.entries(activity.series || {})) {
    let held = buckets.get(model);
    if (!held) buckets.set(model, (held = new Map()));
    for (const [t, requests, tokens, ttft] of rows) {
      held.set(Math.round(t / bucketSize), [requests, tokens, ttft]);
    }
  }
  const oldest = Math.floor((latest - WINDOW_S) / bucketSize);
  for (const [model, held] of buckets) {
    for (const index of held.keys()) if (index < oldest) held.delete(index);
    if (!held.size) buckets.delete(model);
  }
}

/** uPlot's columns for one model: every bucket of the window, empty ones as 0. */
function columns(held) {
  const step = bucketSize;
  const last = Math.floor(latest / step);
  const first = Math.floor((latest - WINDOW_S) / step);
  const xs = [];
  const requests = [];
  const tokens = [];
  const ttft = [];
  for (let index = first; index <= last; index++) {
    const row = held.get(index);
    xs.push(index * step);
    requests.push(row ? row[0] / step : 0);
    tokens.push(row ? row[1] / step : 0);
    ttft.push(row && row[2] !== null && row[2] !== undefined ? row[2] * 1000 : null);
  }
  return [xs, requests, tokens, ttft];
}

function drawCharts() {
  const box = $("#charts");
  for (const model of [...buckets.keys()].sort()) {
    let chart = charts.get(model);
    if (!chart) {
      chart = makeChart(model);
      if (!chart) return; // uPlot did not load: nothing to draw with
      charts.set(model, chart);
    }
    box.append(chart.box);
    chart.plot.setData(columns(buckets.get(model)));
  }
  for (const [model, chart] of charts) {
    if (!buckets.has(model)) {
      chart.plot.destroy();
      chart.observer.disconnect();
      chart.box.remove();
      charts.delete(model);
    }
  }
  $("#charts-empty").hidden = charts.size > 0;
}

function makeChart(model) {
  if (typeof window.uPlot !== "function") return null;
  const box = el("div", { class: "chart-card" }, el("h3", {}, model));
  const area = el("div", { class: "chart", dataset: { model } });
  box.append(area);
  $("#charts").append(box);
  const width = Math.max(280, area.clientWidth || 600);
  const plot = new window.uPlot(chartOptions(width), columns(buckets.get(model)), area);
  const observer = new ResizeObserver(() =>
    requestAnimationFrame(() => {
      if (charts.get(model)?.plot !== plot) return; // destroyed meanwhile
      const w = area.clientWidth;
      if (w > 0 && Math.abs(w - plot.width) > 1) plot.setSize({ width: w, height: HEIGHT });
    }),
  );
  observer.observe(area);
  return { box, plot, observer };
}

function cssVar(name, fallback) {
  const value = getComputedStyle(document.documentElement).getPropertyValue(name).trim();
  return value || fallback;
}

const pad = (n) => String(n).padStart(2, "0");

/** epoch seconds -> "14:05" (axis) */
function hhmm(t) {
  const d = new Date(t * 1000);
  return `${pad(d.getHours())}:${pad(d.getMinutes())}`;
}

/** Draw a dot for a value with no neighbour (a line cannot show it). */
function isolatedPoints(u, seriesIdx, show) {
  if (show) return null; // uPlot draws every point anyway
  const ys = u.data[seriesIdx];
  const lonely = [];
  for (let i = 0; i < ys.length; i++) {
    if (ys[i] !== null && (i === 0 || ys[i - 1] === null) && (i === ys.length - 1 || ys[i + 1] === null)) {
      lonely.push(i);
    }
  }
  return lonely;
}

function chartOptions(width) {
  const text = cssVar("--dim", "#667085");
  const grid = cssVar("--border", "#e3e6eb");
  const axis = { stroke: text, grid: { stroke: grid, width: 1 }, ticks: { stroke: grid, width: 1 } };
  const fixed = (digits) => (u, v) => (v === null || v === undefined ? "–" : v.toFixed(digits));
  const line = (label, scale, color, digits, extra = {}) => ({
    label, scale, stroke: color, width: 1.5, value: fixed(digits), points: { size: 4, fill: color, filter: isolatedPoints }, ...extra,
  });
  return {
    width,
    height: HEIGHT,
    cursor: { drag: { x: false, y: false } },
    scales: {
      x: { time: true },
      // requests/s (a few) and tokens/s (tens to hundreds) each get their own scale
      req: { range: (u, min, max) => [0, Math.max(1, max * 1.1)] },
      rate: { range: (u, min, max) => [0, Math.max(1, max * 1.1)] },
      ms: { range: (u, min, max) => [0, Math.max(100, max * 1.1)] },
    },
    axes: [
      { ...axis, values: (u, splits) => splits.map(hhmm) },
      { ...axis, scale: "rate", label: "tokens/s", size: 46, labelSize: 18 },
      { ...axis, scale: "req", side: 1, label: "requests/s", grid: { show: false }, size: 42, labelSize: 18 },
      { ...axis, scale: "ms", side: 1, label: "TTFT ms", grid: { show: false }, size: 50, labelSize: 18 },
    ],
    series: [
      { label: "time", value: (u, v) => (v === null || v === undefined ? "–" : fmtClock(v)) },
      line("requests/s", "req", cssVar("--c-req", "#2f6fde"), 2),
      line("tokens/s", "rate", cssVar("--c-tok", "#1a8a4a"), 1, { fill: cssVar("--c-tok-fill", "rgba(26,138,74,0.08)") }),
      line("TTFT ms", "ms", cssVar("--c-ttft", "#d9822b"), 0, { dash: [4, 3] }),
    ],
  };
}

/** Redraw the charts with the colours of the current scheme (light/dark switch). */
export function recolorCharts() {
  for (const [model, chart] of charts) {
    chart.plot.destroy();
    chart.observer.disconnect();
    chart.box.remove();
    charts.delete(model);
  }
  drawCharts();
}

function eventKey(e) {
  return `${e.time}|${e.kind}|${e.model}|${e.node}`;
}

function addEvents(events) {
  const list = $("#events");
  const fresh = events.filter((e) => !seenEvents.has(eventKey(e)));
  fresh.sort((a, b) => a.time - b.time);
  for (const event of fresh) {
    seenEvents.add(eventKey(event));
    list.prepend(eventItem(event));
  }
  while (list.children.length > EVENTS_KEPT) {
    const last = list.lastElementChild;
    seenEvents.delete(last.dataset.key);
    last.remove();
  }
  $("#events-empty").hidden = list.children.length > 0;
}

function eventItem(e) {
  const kind = String(e.kind || "event");
  return el(
    "li",
    { class: "event", dataset: { kind, key: eventKey(e), category: e.category || "" } },
    el("time", { datetime: new Date(e.time * 1000).toISOString() }, fmtClock(e.time)),
    el("span", { class: `badge kind k-${kind}` }, kind.replace("_", " ")),
    el("span", { class: "ev-model" }, e.model || ""),
    e.node && e.node !== "-" ? el("span", { class: "ev-node dim" }, `on ${e.node}`) : null,
    e.reason ? el("span", { class: "ev-reason" }, e.reason) : null,
  );
}
