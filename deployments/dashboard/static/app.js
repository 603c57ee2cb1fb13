// Corral's dashboard: the entry point. Switches tabs (kept in location.hash),
// asks who the key is (/api/cluster/whoami), prompts for a key on 401, and
// feeds each live snapshot to the tabs.

import { api, AuthError, clearKey, getKey, hasKey, onUnauthorized, setKey } from "./api.js";
import { startStream, stopStream } from "./stream.js";
import { renderNodes } from "./cluster.js";
import { renderPlacements, setModelsPermission, setupModels } from "./models.js";
import { updateActivity, recolorCharts } from "./activity.js";
import { refreshLibrary, setLibraryPermission, setupLibrary } from "./library.js";
import { loadModelsFile, setPlanPermission, setupPlan } from "./plan.js";
import { closeModal, openModal } from "./dialogs.js";
import { $, $$, toast } from "./util.js";

const TABS = ["cluster", "models", "activity", "library", "plan"];
const RETRY_MS = 5000;
let retryTimer = null;
let failedBefore = false; // whoami failed last time: say it once, not every retry

// Tabs ----------------------------------------------------------------------

function currentTab() {
  const name = location.hash.replace(/^#/, "");
  return TABS.includes(name) ? name : TABS[0];
}

function showTab() {
  const active = currentTab();
  for (const name of TABS) {
    $(`#tab-${name}`).hidden = name !== active;
  }
  for (const link of $$("nav.tabs a[data-tab]")) {
    const on = link.dataset.tab === active;
    link.classList.toggle("active", on);
    if (on) link.setAttribute("aria-current", "page");
    else link.removeAttribute("aria-current");
  }
  if (active === "library" && started) refreshLibrary();
}

// Auth ----------------------------------------------------------------------

let started = false; // whoami answered: the page may read data

function askForKey(refused) {
  started = false;
  stopStream("waiting for a key");
  const dialog = $("#key-dialog");
  if (refused || !dialog.open) $("#key-error").textContent = refused ? "That key was refused" : "";
  if (!dialog.open) {
    $("#key-input").value = "";
    openModal(dialog);
    $("#key-input").focus();
  }
  updateKeyButtons();
}

function updateKeyButtons() {
  $("#key-forget").hidden = !hasKey();
  $("#key-open").hidden = started || $("#key-dialog").open;
}

function submitKey(event) {
  event.preventDefault();
  const key = $("#key-input").value.trim();
  if (!key) return;
  setKey(key);
  $("#key-input").value = "";
  $("#key-error").textContent = "";
  closeModal($("#key-dialog"));
  start();
}

function forgetKey() {
  clearKey();
  started = false;
  stopStream("stopped");
  $("#whoami").hidden = true;
  start();
}

function showWho(who) {
  const box = $("#whoami");
  const key = who?.key;
  if (!key) {
    box.hidden = true;
    box.textContent = "";
    return;
  }
  const count = key.models ? key.models.length : 0;
  const limit = key.limited ? ` (${count} model${count === 1 ? "" : "s"})` : "";
  box.textContent = `key: ${key.name}${limit}`;
  box.title = key.models ? `may use: ${key.models.join(", ")}` : "may use every model";
  box.hidden = false;
}

function applyPermissions(canChange) {
  document.body.classList.toggle("readonly", !canChange);
  const note = $("#readonly-note");
  note.hidden = canChange;
  note.textContent = canChange
    ? ""
    : "This key may look but not change anything: loading, unloading, pulling, copying, deleting and applying are off.";
  setPlanPermission(canChange);
  setModelsPermission(canChange);
  setLibraryPermission(canChange);
}

// Start ---------------------------------------------------------------------

async function start() {
  clearTimeout(retryTimer);
  let who;
  try {
    who = await api("/api/cluster/whoami");
  } catch (err) {
    if (err instanceof AuthError) return; // askForKey is showing the prompt
    if (!failedBefore) toast(`Corral: ${err.message}`, "error");
    failedBefore = true;
    retryTimer = setTimeout(start, RETRY_MS);
    return;
  }
  failedBefore = false;
  started = true;
  closeModal($("#key-dialog"));
  showWho(who);
  applyPermissions(who?.can_change !== false);
  updateKeyButtons();
  startStream(onSnapshot);
  refreshLibrary();
  loadModelsFile();
}

function onSnapshot(data) {
  const time = Number(data.time) || Date.now() / 1000;
  renderNodes(data.nodes === null ? null : Array.isArray(data.nodes) ? data.nodes : []);
  renderPlacements(data.placements || [], time);
  updateActivity(data.activity, data.events, time);
  const error = $("#feed-error");
  error.hidden = !data.error;
  error.textContent = data.error ? `The controller did not answer (${data.error}); showing what it last said.` : "";
}

function setup() {
  onUnauthorized(askForKey);
  setupModels();
  setupLibrary();
  setupPlan();
  window.addEventListener("hashchange", showTab);
  $("#key-form").addEventListener("submit", submitKey);
  $("#key-forget").addEventListener("click", forgetKey);
  $("#key-open").addEventListener("click", () => askForKey(false));
  $("#key-dialog").addEventListener("close", updateKeyButtons);
  matchMedia("(prefers-color-scheme: dark)").addEventListener("change", recolorCharts);
  if (getKey()) updateKeyButtons();
  showTab();
  start();
}

setup();
