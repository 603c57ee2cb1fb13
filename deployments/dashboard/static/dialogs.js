// Modal dialogs: a yes/no confirmation (#confirm-dialog) as a promise, and
// opening a <dialog> without tripping over one that is already open.

import { $ } from "./util.js";

let pending = null; // the open confirmation's "answer no" function

/** Open `dialog` as a modal unless it already is. */
export function openModal(dialog) {
  if (!dialog.open) dialog.showModal();
}

export function closeModal(dialog) {
  if (dialog.open) dialog.close();
}

/** Ask `text`; resolves true for #confirm-yes, false for #confirm-no, Esc or a newer question. */
export function confirmDialog(text, yesLabel = "Yes") {
  pending?.(false);
  const dialog = $("#confirm-dialog");
  const yes = $("#confirm-yes");
  const no = $("#confirm-no");
  $("#confirm-text").textContent = text;
  yes.textContent = yesLabel;
  return new Promise((resolve) => {
    const finish = (answer) => {
      yes.removeEventListener("click", onYes);
      no.removeEventListener("click", onNo);
      dialog.removeEventListener("close", onClose);
      pending = null;
      closeModal(dialog);
      resolve(answer);
    };
    const onYes = () => finish(true);
    const onNo = () => finish(false);
    const onClose = () => {
      if (!dialog.open) finish(false); // a late close of an earlier question is no answer
    };
    yes.addEventListener("click", onYes);
    no.addEventListener("click", onNo);
    dialog.addEventListener("close", onClose);
    pending = finish;
    openModal(dialog);
    no.focus();
  });
}
