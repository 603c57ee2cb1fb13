// Small helpers shared by the dashboard: building elements safely, formatting
// bytes, durations and clock times, and the toast area.

/** `el("td", {class: "num", dataset: {model: m}}, "text", child)`: text is never parsed as HTML. */
export function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs)) {
    if (value === null || value === undefined || value === false) continue;
    if (name === "dataset") Object.assign(node.dataset, value);
    else if (name === "class") node.className = value;
    else if (name === "text") node.textContent = value;
    else if (value === true) node.setAttribute(name, "");
    else node.setAttribute(name, String(value));
  }
  append(node, children);
  return node;
}

/** Replace `node`'s children; null, undefined and false ones are left out. */
export function fill(node, ...children) {
  node.replaceChildren();
  append(node, children);
  return node;
}

function append(node, children) {
  for (const child of children.flat()) {
    if (child === null || child === undefined || child === false) continue;
    node.append(child instanceof Node ? child : String(child));
  }
}

/** Give each cell of `row` its column's header as data-label (phones show it above the value). */
export function labelCells(row, table) {
  const heads = table.tHead ? [...table.tHead.rows[0].cells] : [];
  [...row.cells].forEach((cell, i) => {
    const head = heads[i];
    if (head && !head.querySelector(".sr-only")) cell.dataset.label = head.textContent.trim();
  });
}

export const $ = (selector, root = document) => root.querySelector(selector);
export const $$ = (selector, root = document) => [...root.querySelectorAll(selector)];

const UNITS = ["B", "KiB", "MiB", "GiB", "TiB"];

/** 3263741824 -> "3.0 GiB" */
export function fmtBytes(bytes) {
  if (bytes === null || bytes === undefined || !Number.isFinite(bytes)) return "–";
  let value = Math.max(0, bytes);
  let unit = 0;
  while (value >= 1024 && unit < UNITS.length - 1) {
    value /= 1024;
    unit += 1;
  }
  return unit === 0 ? `${value} B` : `${value.toFixed(1)} ${UNITS[unit]}`;
}

/** 130 -> "2m 10s", 7300 -> "2h 1m", 90000 -> "1d 1h" */
export function fmtDuration(seconds) {
  let s = Math.max(0, Math.round(seconds));
  const d = Math.floor(s / 86400);
  s -= d * 86400;
  const h = Math.floor(s / 3600);
  s -= h * 3600;
  const m = Math.floor(s / 60);
  s -= m * 60;
  if (d) return `${d}d ${h}h`;
  if (h) return `${h}h ${m}m`;
  if (m) return `${m}m ${s}s`;
  return `${s}s`;
}

const pad = (n) => String(n).padStart(2, "0");

/** epoch seconds -> "14:03:07", with the date in front when it is not today. */
export function fmtClock(epoch) {
  const date = new Date(epoch * 1000);
  const clock = `${pad(date.getHours())}:${pad(date.getMinutes())}:${pad(date.getSeconds())}`;
  if (date.toDateString() === new Date().toDateString()) return clock;
  return `${date.getFullYear()}-${pad(date.getMonth() + 1)}-${pad(date.getDate())} ${clock}`;
}

/** 1234.5 -> "1,235" ; 12.34 -> "12.3" */
export function fmtNumber(value, digits = 1) {
  if (value === null || value === undefined || !Number.isFinite(value)) return "–";
  return value.toLocaleString(undefined, { maximumFractionDigits: digits });
}

const TOAST_MS = 6000;

/** Show a short message in #toast; kind "error" makes it red. */
export function toast(message, kind = "info") {
  const area = document.getElementById("toast");
  if (!area) return;
  const item = el("div", { class: `toast-item ${kind}` }, message);
  const close = el("button", { type: "button", class: "toast-close", "aria-label": "Dismiss" }, "×");
  close.addEventListener("click", () => item.remove());
  item.append(close);
  area.append(item);
  while (area.children.length > 4) area.firstElementChild.remove();
  setTimeout(() => item.remove(), kind === "error" ? TOAST_MS * 1.5 : TOAST_MS);
}

/** Mark a button busy (disabled, another label) until the promise settles. */
export async function busy(button, label, work) {
  const before = button.textContent;
  button.disabled = true;
  button.classList.add("busy");
  button.textContent = label;
  try {
    return await work();
  } finally {
    button.classList.remove("busy");
    button.textContent = before;
    button.disabled = false;
  }
}

export const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));
