// The Library tab: the models on disk (/api/tags) with their capabilities
// (/api/show), pulling with a progress bar (NDJSON from /api/pull), copying and
// deleting. It also fills the model names the load form offers.

import { api, request, readLines, AuthError } from "./api.js";
import { confirmDialog, openModal, closeModal } from "./dialogs.js";
import { $, busy, el, fmtBytes, fmtClock, labelCells, toast } from "./util.js";

const SHOW_AT_ONCE = 4; // /api/show calls in flight together
const capabilities = new Map(); // "name@digest" -> [capability] (they do not change)
let generation = 0; // a newer refresh makes an older one stop drawing
let copySource = "";
let canChange = true; // false: no copy or delete buttons at all

/** Whether this key may change the library (whoami's can_change). */
export function setLibraryPermission(allowed) {
  canChange = allowed;
}

/** Reload the library table and the load form's model names. */
export async function refreshLibrary() {
  const mine = ++generation;
  let answer;
  try {
    answer = await api("/api/tags");
  } catch (err) {
    if (!(err instanceof AuthError)) toast(`Library: ${err.message}`, "error");
    return;
  }
  if (mine !== generation) return;
  const models = [...(answer?.models || [])].sort((a, b) => a.name.localeCompare(b.name));
  renderTable(models);
  fillNames(models);
  await fillCapabilities(models, mine);
}

function renderTable(models) {
  const body = $("#library tbody");
  body.replaceChildren(...models.map(libraryRow));
  for (const row of body.rows) labelCells(row, $("#library"));
  $("#library").hidden = models.length === 0;
  $("#library-empty").hidden = models.length > 0;
}

function libraryRow(m) {
  const details = m.details || {};
  const modified = m.modified_at ? Date.parse(m.modified_at) : NaN;
  return el(
    "tr",
    { class: "library-model", dataset: { model: m.name } },
    el(
      "td",
      { class: "name" },
      m.name,
      Number.isFinite(modified)
        ? el("span", { class: "sub dim" }, `modified ${fmtClock(modified / 1000)}`)
        : null,
    ),
    el("td", { class: "num size" }, fmtBytes(m.size)),
    el("td", { class: "family" }, details.family || "–"),
    el("td", { class: "params" }, details.parameter_size || "–"),
    el("td", { class: "quant" }, details.quantization_level || "–"),
    el("td", { class: "caps" }, capBadges(capabilities.get(capKey(m)))),
    el(
      "td",
      { class: "actions" },
      canChange ? actionButton("copy", m.name, "Copy", () => openCopy(m.name)) : null,
      canChange ? actionButton("delete", m.name, "Delete", (button) => remove(m.name, button)) : null,
    ),
  );
}

function actionButton(kind, model, label, onClick) {
  const button = el("button", { type: "button", class: `${kind} small changer`, dataset: { model } }, label);
  button.addEventListener("click", () => onClick(button));
  return button;
}

const capKey = (m) => `${m.name}@${m.digest || ""}`;

function capBadges(caps) {
  if (caps === undefined) return el("span", { class: "dim" }, "…");
  if (!caps || !caps.length) return el("span", { class: "dim" }, "–");
  return caps.map((cap) => el("span", { class: "badge cap", dataset: { cap } }, cap));
}

function fillNames(models) {
  const list = $("#library-names");
  list.replaceChildren(...models.map((m) => el("option", { value: m.name })));
}

/** Ask /api/show for each model's capabilities, a few at a time. */
async function fillCapabilities(models, mine) {
  const todo = models.filter((m) => !capabilities.has(capKey(m)));
  const worker = async () => {
    while (todo.length && mine === generation) {
      const model = todo.shift();
      const caps = await showCapabilities(model.name);
      if (caps === undefined) return; // 401: the key prompt is up
      if (caps) capabilities.set(capKey(model), caps); // a failed /api/show is asked again next time
      const row = $(`#library tr.library-model[data-model="${CSS.escape(model.name)}"]`);
      if (row) row.querySelector(".caps").replaceChildren(...[capBadges(caps)].flat());
    }
  };
  await Promise.all(Array.from({ length: SHOW_AT_ONCE }, worker));
}

async function showCapabilities(name) {
  try {
    const shown = await api("/api/show", { method: "POST", body: { model: name } });
    return Array.isArray(shown?.capabilities) ? shown.capabilities : null;
  } catch (err) {
    return err instanceof AuthError ? undefined : null;
  }
}

// Pull ---------------------------------------------------------------------

async function pull(event) {
  event.preventDefault();
  const name = $("#pull-name").value.trim();
  if (!name) return;
  $("#pull-box").hidden = false;
  setPullStatus("starting…", false);
  showProgress(0, 0);
  let outcome;
  try {
    outcome = await busy($("#pull-submit"), "Pulling…", () => runPull(name));
  } catch (err) {
    outcome = err instanceof AuthError ? { error: "A key is needed" } : { error: err.message };
  }
  if (outcome.ok) {
    showProgress(1, 1);
    setPullStatus(`${name}: success`, false);
    toast(`Pulled ${name}`);
    $("#pull-name").value = "";
    refreshLibrary();
  } else {
    setPullStatus(`${name}: ${outcome.error}`, true);
    toast(`Pull ${name}: ${outcome.error}`, "error");
  }
}

/** Read the NDJSON answer; resolves {ok: true} or {error}. */
async function runPull(name) {
  const body = { model: name, stream: true };
  if ($("#pull-insecure").checked) body.insecure = true;
  const response = await request("/api/pull", { method: "POST", body });
  let outcome = { error: "the pull ended without success" };
  await readLines(response.body, (line) => {
    if (!line.trim()) return true;
    let message;
    try {
      message = JSON.parse(line);
    } catch {
      return true;
    }
    if (message.error) {
      outcome = { error: String(message.error) };
      return false;
    }
    if (message.status === "success") outcome = { ok: true };
    pullProgress(message);
    return true;
  });
  return outcome;
}

function pullProgress(message) {
  const status = shortDigest(String(message.status || ""));
  if (message.total > 0) {
    const done = Math.min(message.completed || 0, message.total);
    showProgress(done, message.total);
    setPullStatus(`${status} ${Math.floor((done / message.total) * 100)}%`, false);
  } else {
    if (message.status !== "success") showProgress(null, 0);
    setPullStatus(status, false);
  }
}

const shortDigest = (text) => text.replace(/(sha256:[0-9a-f]{12})[0-9a-f]+/gi, "$1…");

/** value null: an indeterminate bar (no sizes known yet). */
function showProgress(value, max) {
  const bar = $("#pull-progress");
  if (value === null) {
    bar.removeAttribute("value");
    return;
  }
  bar.max = max || 1;
  bar.value = value;
}

function setPullStatus(text, isError) {
  const status = $("#pull-status");
  status.textContent = text;
  status.classList.toggle("error-text", isError);
}

// Delete and copy ------------------------------------------------------------

async function remove(name, button) {
  if (!(await confirmDialog(`Delete ${name} from the library?`, "Delete"))) return;
  try {
    await busy(button, "Deleting…", () => api("/api/delete", { method: "DELETE", body: { model: name } }));
    toast(`Deleted ${name}`);
  } catch (err) {
    if (!(err instanceof AuthError)) toast(`Delete ${name}: ${err.message}`, "error");
  }
  refreshLibrary();
}

function openCopy(name) {
  copySource = name;
  $("#copy-source").textContent = name;
  $("#copy-dest").value = "";
  openModal($("#copy-dialog"));
  $("#copy-dest").focus();
}

async function copy(event) {
  event.preventDefault();
  const destination = $("#copy-dest").value.trim();
  if (!destination) return;
  try {
    await busy($("#copy-submit"), "Copying…", () =>
      api("/api/copy", { method: "POST", body: { source: copySource, destination } }),
    );
    closeModal($("#copy-dialog"));
    toast(`Copied ${copySource} to ${destination}`);
  } catch (err) {
    if (err instanceof AuthError) closeModal($("#copy-dialog"));
    else toast(`Copy: ${err.message}`, "error");
  }
  refreshLibrary();
}

export function setupLibrary() {
  $("#pull-form").addEventListener("submit", pull);
  $("#copy-form").addEventListener("submit", copy);
  $("#copy-cancel").addEventListener("click", () => closeModal($("#copy-dialog")));
}
