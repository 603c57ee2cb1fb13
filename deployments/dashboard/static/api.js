// Talking to Corral's API: the stored key, fetch with the Authorization header,
// and errors turned into exceptions the page can show. A 401 from any call
// forgets the key and asks the page (via onUnauthorized) for a new one.

const KEY_SLOT = "corral.key";

/** Raised for an answer that is not 2xx; `message` is the server's own words. */
export class ApiError extends Error {
  constructor(message, status) {
    super(message);
    this.name = "ApiError";
    this.status = status;
  }
}

/** Raised for a 401: the page already shows the key prompt, so callers say nothing. */
export class AuthError extends ApiError {
  constructor() {
    super("A key is needed", 401);
    this.name = "AuthError";
  }
}

let unauthorizedHandler = () => {};
let memoryKey = ""; // used only when sessionStorage refuses to keep the key

/** `handler(hadKey)` runs on every 401; hadKey tells a refused key from a missing one. */
export function onUnauthorized(handler) {
  unauthorizedHandler = handler;
}

export function getKey() {
  try {
    return sessionStorage.getItem(KEY_SLOT) || "";
  } catch {
    return "";
  }
}

export function setKey(key) {
  try {
    sessionStorage.setItem(KEY_SLOT, key);
  } catch {
    // storage may be off (private mode): the key then lives for this page only
  }
  memoryKey = key;
}

export function clearKey() {
  try {
    sessionStorage.removeItem(KEY_SLOT);
  } catch {
    // nothing stored
  }
  memoryKey = "";
}

const currentKey = () => getKey() || memoryKey;

export const hasKey = () => Boolean(currentKey());

/**
 * fetch() `path` with the key; `body` (an object) is sent as JSON. Resolves to the
 * Response when it is 2xx, throws AuthError on 401 and ApiError otherwise.
 */
export async function request(path, { method = "GET", body, signal, headers = {} } = {}) {
  const sent = currentKey();
  const options = { method, signal, headers: { ...headers }, cache: "no-store" };
  if (sent) options.headers.Authorization = `Bearer ${sent}`;
  if (body !== undefined) {
    options.headers["Content-Type"] = "application/json";
    options.body = JSON.stringify(body);
  }
  let response;
  try {
    response = await fetch(path, options);
  } catch (err) {
    if (err && err.name === "AbortError") throw err;
    throw new ApiError("Corral did not answer (network error)", 0);
  }
  if (response.status === 401) {
    // An answer to an older key (the user has since entered another) asks nothing.
    if (currentKey() === sent) {
      clearKey();
      unauthorizedHandler(Boolean(sent));
    }
    throw new AuthError();
  }
  if (!response.ok) throw new ApiError(await errorMessage(response), response.status);
  return response;
}

/** Like request(), resolving to the parsed JSON body. */
export async function api(path, options) {
  const response = await request(path, options);
  const text = await response.text();
  if (!text) return null;
  try {
    return JSON.parse(text);
  } catch {
    throw new ApiError(`Unreadable answer from ${path}`, response.status);
  }
}

/** The message in an error answer: {"error": "..."}, {"error": {"message"}} or {"detail"}. */
async function errorMessage(response) {
  let text = "";
  try {
    text = await response.text();
    const body = JSON.parse(text);
    const error = body.error ?? body.detail;
    if (typeof error === "string") return error;
    if (error && typeof error.message === "string") return error.message;
    if (Array.isArray(error) && error[0]?.msg) return error.map((e) => e.msg).join("; ");
  } catch {
    // not JSON: fall back to the text or the status
  }
  if (response.status === 403) return "This key may not do that";
  return text.trim().slice(0, 200) || `${response.status} ${response.statusText}`.trim();
}

/** Read an NDJSON or text stream line by line: `onLine(text)` for each line (empty
 * ones too); returning false from it stops reading. */
export async function readLines(body, onLine) {
  const reader = body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  try {
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, { stream: true });
      let cut;
      while ((cut = buffer.search(/\r?\n/)) >= 0) {
        const line = buffer.slice(0, cut);
        buffer = buffer.slice(buffer[cut] === "\r" ? cut + 2 : cut + 1);
        if (onLine(line) === false) return;
      }
    }
    buffer += decoder.decode();
    if (buffer) onLine(buffer);
  } finally {
    reader.cancel().catch(() => {});
  }
}
