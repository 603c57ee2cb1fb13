// The Plan tab: edit models.yaml, preview what applying it would change
// (/api/cluster/plan) and apply it (/api/cluster/apply) after a confirmation.
// Apply is enabled only while the text is exactly the one last previewed.

import { api, AuthError } from "./api.js";
import { confirmDialog } from "./dialogs.js";
import { $, busy, el, fill, toast } from "./util.js";

let previewed = null; // the text of the last good preview
let lastReport = null;
let canChange = true;
let applying = false;
let edited = false; // the user typed: a reload of the file must not overwrite it

const OPS = { "+": "add", "-": "remove", "~": "change" };

export function setPlanPermission(allowed) {
  canChange = allowed;
  updateApply();
}

function updateApply() {
  const text = $("#plan-text").value;
  const ready = canChange && !applying && previewed !== null && previewed === text;
  $("#plan-apply").disabled = !ready;
}

/** Fill the editor with the applied models.yaml unless the user has edited it. */
export async function loadModelsFile() {
  if (edited) return;
  try {
    const answer = await api("/api/cluster/models-file");
    if (edited) return;
    $("#plan-text").value = answer?.text ?? "";
    updateApply();
  } catch (err) {
    if (err instanceof AuthError) return;
    if (err.status === 403) showError($("#plan-result"), err.message);
    else toast(`models.yaml: ${err.message}`, "error");
  }
}

function onEdit() {
  edited = true;
  $("#plan-result").classList.toggle("stale", previewed !== $("#plan-text").value);
  updateApply();
}

async function preview() {
  const text = $("#plan-text").value;
  const result = $("#plan-result");
  previewed = null;
  updateApply();
  try {
    const report = await busy($("#plan-preview"), "Previewing…", () =>
      api("/api/cluster/plan", { method: "POST", body: { models_yaml: text } }),
    );
    lastReport = report;
    renderReport(result, report, "Preview");
    previewed = text;
  } catch (err) {
    if (!(err instanceof AuthError)) showError(result, err.message);
  }
  result.classList.remove("stale");
  updateApply();
}

async function apply() {
  const text = $("#plan-text").value;
  if (previewed !== text) return;
  const count = (op) => (lastReport?.changes || []).filter((c) => c.op === op).length;
  const question = `Apply this plan: ${count("+")} to add, ${count("~")} to change, ${count("-")} to remove?`;
  if (!(await confirmDialog(question, "Apply"))) return;
  const result = $("#apply-result");
  applying = true;
  result.replaceChildren(el("p", { class: "dim" }, "Applying… this can take minutes."));
  result.classList.remove("error");
  try {
    const report = await busy($("#plan-apply"), "Applying…", () =>
      api("/api/cluster/apply", { method: "POST", body: { models_yaml: text } }),
    );
    renderReport(result, report, "Applied");
    const failed = (report.changes || []).filter((c) => c.failed).length;
    toast(failed ? `Applied, ${failed} change(s) failed` : "Applied", failed ? "error" : "info");
    previewed = null; // the cluster changed: preview again before another apply
    $("#plan-result").classList.add("stale");
  } catch (err) {
    if (err instanceof AuthError) result.replaceChildren();
    else showError(result, err.message);
  } finally {
    applying = false;
    updateApply();
  }
}

function showError(box, message) {
  box.classList.add("error");
  box.replaceChildren(el("p", {}, message));
}

/** Draw a plan or apply REPORT into `box`, under a small `title`. */
export function renderReport(box, report, title) {
  box.classList.remove("error");
  const changes = report?.changes || [];
  const unchanged = report?.unchanged || [];
  fill(
    box,
    el("div", { class: "report-title" }, title),
    ...changes.map(changeLine),
    unchanged.length ? el("div", { class: "unchanged" }, `= unchanged: ${unchanged.join(", ")}`) : null,
    ...(report?.unplaced || []).map(unplacedLine),
    ...(report?.notes || []).map((note) => el("div", { class: "note" }, note)),
    report?.summary ? el("div", { class: "summary" }, report.summary) : null,
  );
  if (box.children.length === 1) box.append(el("div", { class: "summary" }, "Nothing to change."));
}

function changeLine(c) {
  const where = c.node ? ` on ${c.node}` : "";
  const detail = c.detail ? `: ${c.detail}` : "";
  const line = el(
    "div",
    {
      class: `change op-${OPS[c.op] || "other"}${c.failed ? " failed" : ""}`,
      dataset: { op: c.op, model: c.model ?? "", node: c.node ?? "" },
    },
    el(
      "div",
      { class: "what" },
      c.failed ? el("span", { class: "mark", "aria-label": "failed" }, "✗ ") : null,
      `${c.op} ${c.model}${where}${detail}`,
      c.reload ? el("span", { class: "reload" }, " (reloads)") : null,
    ),
  );
  if (c.reason) line.append(el("div", { class: "reason" }, c.reason));
  if (c.failed) line.append(el("div", { class: "failure" }, `failed: ${c.failed}`));
  return line;
}

function unplacedLine(u) {
  const reason = u.reason ? `: ${u.reason}` : "";
  return el(
    "div",
    { class: "unplaced", dataset: { model: u.model ?? "" } },
    `! ${u.model}: ${u.placed} of ${u.wanted} replicas placed${reason}`,
  );
}

export function setupPlan() {
  $("#plan-text").addEventListener("input", onEdit);
  $("#plan-preview").addEventListener("click", preview);
  $("#plan-apply").addEventListener("click", apply);
}
