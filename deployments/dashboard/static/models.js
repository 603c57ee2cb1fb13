// The Models tab: the table of placements (a model on a node) from the live feed,
// with countdowns that tick every second, the Unload buttons and the load form.

import { api, AuthError } from "./api.js";
import { $, busy, el, fill, fmtBytes, fmtDuration, fmtNumber, labelCells, toast } from "./util.js";

const rows = new Map(); // "model\nnode" -> {tr, placement}
const unloadButtons = new Map(); // model -> <button> (one per model, kept across redraws)
let canChange = true; // false: no Unload buttons at all
let skew = 0; // server clock minus ours, in seconds
let snapshotAt = 0; // server time of the placements shown

const serverNow = () => Date.now() / 1000 + skew;

/** Whether this key may load and unload (whoami's can_change). */
export function setModelsPermission(allowed) {
  canChange = allowed;
  if (!allowed) {
    for (const button of unloadButtons.values()) button.remove();
    unloadButtons.clear();
  }
}

/** Draw the placements of a snapshot taken at server time `time`. */
export function renderPlacements(placements, time) {
  skew = time - Date.now() / 1000;
  snapshotAt = time;
  const body = $("#placements tbody");
  const sorted = [...placements].sort(
    (a, b) => String(a.model).localeCompare(String(b.model)) || String(a.node).localeCompare(String(b.node)),
  );
  const seen = new Set();
  const buttonPlaced = new Set();
  for (const placement of sorted) {
    const key = `${placement.model}\n${placement.node}`;
    seen.add(key);
    let row = rows.get(key);
    if (!row) {
      row = { tr: el("tr", { class: "placement" }) };
      rows.set(key, row);
    }
    row.placement = placement;
    const withButton = canChange && !buttonPlaced.has(placement.model);
    buttonPlaced.add(placement.model);
    fillRow(row.tr, placement, withButton);
    body.append(row.tr);
  }
  for (const [key, row] of rows) {
    if (!seen.has(key)) {
      row.tr.remove();
      rows.delete(key);
    }
  }
  for (const model of unloadButtons.keys()) {
    if (!buttonPlaced.has(model)) unloadButtons.delete(model);
  }
  $("#placements-empty").hidden = sorted.length > 0;
  $("#placements").hidden = sorted.length === 0;
  tick();
}

/** "gpubox", or for a model split over boxes "minipc 20 layers + nas 11". */
function nodeText(p) {
  if (!p.parts || !p.parts.length) return p.node;
  return [`${p.node} ${p.layers} layers`, ...p.parts.map((q) => `${q.node} ${q.layers}`)].join(" + ");
}

function fillRow(tr, p, withButton) {
  tr.dataset.model = p.model;
  tr.dataset.node = p.node;
  tr.dataset.status = p.status || "";
  tr.classList.toggle("failed", p.status === "FAILED");
  fill(
    tr,
    modelCell(p),
    el("td", { class: "node" }, nodeText(p)),
    el("td", { class: "num replicas" }, String(p.replicas ?? "–")),
    slotsCell(p),
    el("td", { class: "num rate" }, fmtNumber(p.tokens_per_s ?? 0, 1)),
    el("td", { class: "idle" }),
    el("td", { class: "unloads" }),
    el("td", { class: "pinned" }, p.pinned ? el("span", { class: "badge" }, "pinned") : "–"),
    memoryCell(p),
    statusCell(p),
    el("td", { class: "actions" }, withButton ? unloadButton(p.model) : null),
  );
  labelCells(tr, $("#placements"));
}

function modelCell(p) {
  const extra = [];
  if (p.context) extra.push(`ctx ${p.context}`);
  if (p.declared) extra.push("declared");
  return el(
    "td",
    { class: "model", title: p.reason || null },
    el("span", { class: "name" }, p.model),
    extra.length ? el("span", { class: "sub dim" }, extra.join(" · ")) : null,
  );
}

function slotsCell(p) {
  const used = `${p.in_flight ?? 0}/${p.slots ?? "–"}`;
  const queued = p.queued > 0 ? el("span", { class: "queued" }, ` · ${p.queued} queued`) : null;
  return el("td", { class: "slots" }, used, queued);
}

function memoryCell(p) {
  const replicas = p.replicas || 0;
  const ram = p.ram || 0;
  const vram = p.vram || 0;
  if (p.parts && p.parts.length) {
    const lent = p.parts.reduce((sum, q) => sum + q.ram + (q.vram || 0), 0);
    const held = (q) => `${fmtBytes(q.ram)}${q.vram ? ` + VRAM ${fmtBytes(q.vram)}` : ""}`;
    const title = [`${p.node}: ${held(p)}`, ...p.parts.map((q) => `${q.node}: ${held(q)}`)];
    return el("td", { class: "num memory", title: title.join(", ") }, fmtBytes(ram + vram + lent));
  }
  const title = `per replica: RAM ${fmtBytes(ram)}${vram ? `, VRAM ${fmtBytes(vram)}` : ""} × ${replicas}`;
  return el("td", { class: "num memory", title }, fmtBytes((ram + vram) * replicas));
}

function statusCell(p) {
  const status = p.status || "?";
  const cell = el("td", { class: "status" }, el("span", { class: `badge st-${status.toLowerCase()}` }, status));
  const failure = p.failure;
  if (failure && failure.reason) {
    cell.append(el("span", { class: "failure" }, failure.reason));
    if (failure.retry_at) {
      cell.append(el("span", { class: "sub dim retry", dataset: { at: failure.retry_at } }));
    }
  }
  return cell;
}

function unloadButton(model) {
  let button = unloadButtons.get(model);
  if (!button) {
    button = el("button", { type: "button", class: "unload small changer", dataset: { model } }, "Unload");
    button.addEventListener("click", () => unload(model, button));
    unloadButtons.set(model, button);
  }
  return button;
}

/** Every second: the idle times, the keep-alive countdowns and retry times. */
export function tick() {
  const now = serverNow();
  for (const { tr, placement: p } of rows.values()) {
    const idle = tr.querySelector(".idle");
    if (p.idle_for === null || p.idle_for === undefined) idle.textContent = "serving";
    else idle.textContent = `idle ${fmtDuration(p.idle_for + Math.max(0, now - snapshotAt))}`;
    tr.querySelector(".unloads").textContent = unloadsText(p, now);
    const retry = tr.querySelector(".retry");
    if (retry) {
      const left = Number(retry.dataset.at) - now;
      retry.textContent = left > 0 ? `retry in ${fmtDuration(left)}` : "retrying";
    }
  }
}

function unloadsText(p, now) {
  if (p.held) return "never (held)";
  if (p.expires_at === null || p.expires_at === undefined) return "never";
  const left = p.expires_at - now;
  return left > 0 ? `in ${fmtDuration(left)}` : "now";
}

async function unload(model, button) {
  try {
    await busy(button, "Unloading…", () =>
      api("/api/generate", { method: "POST", body: { model, keep_alive: 0, stream: false } }),
    );
    toast(`${model} unloaded`);
  } catch (err) {
    if (!(err instanceof AuthError)) toast(`Unload ${model}: ${err.message}`, "error");
  }
}

async function load(event) {
  event.preventDefault();
  const input = $("#load-model");
  const button = $("#load-form button");
  const model = input.value.trim();
  if (!model) return;
  $("#load-form").setAttribute("aria-busy", "true");
  try {
    await busy(button, "Loading…", () =>
      api("/api/generate", { method: "POST", body: { model, stream: false } }),
    );
    toast(`${model} loaded`);
    input.value = "";
  } catch (err) {
    if (!(err instanceof AuthError)) toast(`Load ${model}: ${err.message}`, "error");
  } finally {
    $("#load-form").removeAttribute("aria-busy");
  }
}

export function setupModels() {
  $("#load-form").addEventListener("submit", load);
  setInterval(tick, 1000);
}
