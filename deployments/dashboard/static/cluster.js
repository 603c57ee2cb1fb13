// The Cluster tab: one card per node with its state, CPU, RAM and VRAM bars
// (Corral's models / other use / free) and the models placed there.

import { el, fill, fmtBytes, fmtClock, fmtDuration } from "./util.js";

const cards = new Map(); // node name -> <article>

/** Draw `nodes` (null: this key may not see nodes). */
export function renderNodes(nodes) {
  const box = document.getElementById("nodes");
  const note = document.getElementById("nodes-note");
  note.hidden = nodes !== null;
  document.querySelector("#tab-cluster .legend").hidden = nodes === null;
  box.hidden = nodes === null;
  if (nodes === null) {
    box.replaceChildren();
    cards.clear();
    return;
  }
  box.querySelector(":scope > .empty")?.remove();
  const sorted = [...nodes].sort(byRoleThenName);
  const seen = new Set();
  for (const node of sorted) {
    seen.add(node.name);
    let card = cards.get(node.name);
    if (!card) {
      card = el("article", { class: "node-card", dataset: { node: node.name } });
      cards.set(node.name, card);
    }
    fillCard(card, node);
    box.append(card); // (re)appending keeps the sorted order
  }
  for (const [name, card] of cards) {
    if (!seen.has(name)) {
      card.remove();
      cards.delete(name);
    }
  }
  if (!sorted.length) box.replaceChildren(el("p", { class: "empty" }, "No node has joined yet."));
}

function byRoleThenName(a, b) {
  const rank = (n) => (n.role === "head" ? 0 : 1);
  return rank(a) - rank(b) || String(a.name).localeCompare(String(b.name));
}

function fillCard(card, node) {
  const down = node.state !== "up";
  card.dataset.state = down ? "down" : "up";
  card.classList.toggle("down", down);
  fill(
    card,
    cardHead(node, down),
    stateLine(node, down),
    node.note ? el("p", { class: "node-note" }, node.note) : null,
    cpuLine(node),
    memory("ram", "RAM", node.ram_total, node.ram_used, node.ram_models),
    node.vram_total > 0
      ? memory("vram", "VRAM", node.vram_total, node.vram_used, node.vram_models)
      : null,
    node.vram_total > 0 ? gpuList(node.gpus || []) : null,
    modelList(node.models || []),
  );
}

function cardHead(node, down) {
  const role = node.role && node.role !== "-" ? node.role : null;
  return el(
    "header",
    { class: "card-head" },
    el("h3", {}, node.name),
    role ? el("span", { class: `badge role ${role}` }, role) : null,
    el("span", { class: `badge state ${down ? "bad" : "ok"}` }, down ? "down" : "up"),
  );
}

function stateLine(node, down) {
  const address = node.address ? el("span", { class: "address" }, node.address) : null;
  let since = null;
  if (node.since) {
    const ago = fmtDuration(Date.now() / 1000 - node.since);
    since = el(
      "span",
      { class: "since", title: `${ago} ago` },
      `${down ? "down" : "up"} since ${fmtClock(node.since)}`,
    );
  }
  return el("p", { class: "node-meta dim" }, since, since && address ? " · " : null, address);
}

function cpuLine(node) {
  const parts = [];
  if (node.cpu_cores) parts.push(`${node.cpu_cores} cores`);
  if (node.load_avg !== null && node.load_avg !== undefined) {
    parts.push(`load ${Number(node.load_avg).toFixed(1)}`);
  }
  return el(
    "p",
    { class: "cpu" },
    el("span", { class: "cpu-model" }, node.cpu_model || "CPU unknown"),
    parts.length ? el("span", { class: "cpu-load dim" }, parts.join(" · ")) : null,
  );
}

/** A bar of models / other / free with its text line, for "ram" or "vram". */
function memory(kind, label, total, used, models) {
  const wrap = el("div", { class: `mem ${kind}` });
  if (!(total > 0) || used === null || used === undefined) {
    wrap.append(el("p", { class: `${kind}-text dim` }, `${label} not reported`));
    return wrap;
  }
  const held = Math.max(0, models || 0);
  const other = Math.max(0, used - held);
  const free = Math.max(0, total - used);
  const bar = el("div", {
    class: `bar ${kind}-bar`,
    role: "img",
    "aria-label": `${label}: ${fmtBytes(used)} used of ${fmtBytes(total)}`,
    "data-total": total,
    "data-models": held,
    "data-other": other,
    "data-free": free,
  });
  for (const [name, bytes] of [["models", held], ["other", other], ["free", free]]) {
    const segment = el("span", { class: `seg ${name}` });
    segment.style.width = `${Math.min(100, (bytes / total) * 100).toFixed(2)}%`;
    bar.append(segment);
  }
  const text = `${label} ${fmtBytes(held)} models · ${fmtBytes(other)} other · ${fmtBytes(free)} free of ${fmtBytes(total)}`;
  wrap.append(bar, el("p", { class: `${kind}-text mem-text` }, text));
  return wrap;
}

function gpuList(gpus) {
  if (!gpus.length) return null;
  return el(
    "ul",
    { class: "gpus dim" },
    gpus.map((gpu) =>
      el("li", {}, `${gpu.name} · ${fmtBytes(gpu.vram_used)} of ${fmtBytes(gpu.vram_total)}`),
    ),
  );
}

function modelList(models) {
  const list = el("ul", { class: "node-models" }, models.map((name) => el("li", {}, name)));
  if (models.length) return list;
  return el("div", {}, list, el("p", { class: "dim small" }, "no models here"));
}
