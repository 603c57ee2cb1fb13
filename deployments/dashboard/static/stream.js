// The live feed: one fetch() of /api/cluster/stream per tab, read as Server-Sent
// Events (EventSource cannot send the Authorization header). Reconnects with
// back-off (1 s, 2 s, then 5 s) and shows its state in #conn.

import { request, readLines, AuthError, ApiError } from "./api.js";

const PATH = "/api/cluster/stream";
const BACKOFF_MS = [1000, 2000, 5000];
const SILENCE_MS = 20000; // no byte for this long (not even a keep-alive): reconnect

let running = false;
let generation = 0; // a stop and a start make the old loop end on its own
let connection = null; // AbortController of the open request
let wakeUp = null; // resolves the back-off wait early (stop)
let onSnapshot = () => {};

/** Start the stream; `handler(data)` gets each snapshot's parsed JSON. */
export function startStream(handler) {
  onSnapshot = handler;
  if (running) return;
  running = true;
  generation += 1;
  loop(generation);
}

export function stopStream(text = "stopped") {
  running = false;
  connection?.abort();
  wakeUp?.();
  setState("reconnecting", text);
}

function setState(state, text) {
  const conn = document.getElementById("conn");
  if (!conn) return;
  conn.dataset.state = state;
  conn.textContent = text;
}

async function loop(mine) {
  const current = () => running && mine === generation;
  let attempt = 0;
  while (current()) {
    const { got, why } = await connectOnce();
    if (!current()) return;
    if (got === "auth") {
      running = false;
      setState("reconnecting", "waiting for a key");
      return;
    }
    if (got === "data") attempt = 0;
    const delay = BACKOFF_MS[Math.min(attempt, BACKOFF_MS.length - 1)];
    attempt += 1;
    const retry = `reconnecting in ${delay / 1000} s…`;
    setState("reconnecting", why ? `${why}; ${retry}` : retry);
    await wait(delay);
  }
}

/** One connection. `got`: "data" if a snapshot came, "none" if not, "auth" on a 401;
 * `why`: the server's words when it refused the stream. */
async function connectOnce() {
  const controller = new AbortController();
  connection = controller;
  let got = "none";
  let why = "";
  let watchdog = null;
  const feed = () => {
    clearTimeout(watchdog);
    watchdog = setTimeout(() => controller.abort(), SILENCE_MS);
  };
  try {
    feed();
    const response = await request(PATH, {
      signal: controller.signal,
      headers: { Accept: "text/event-stream" },
    });
    setState("live", "live");
    const parser = sseParser((event, data) => {
      if (event !== "snapshot") return;
      got = "data";
      onSnapshot(data);
    });
    await readLines(response.body, (line) => {
      feed();
      parser(line);
      return running;
    });
  } catch (err) {
    if (err instanceof AuthError) got = "auth";
    else if (err instanceof ApiError && err.status > 0) why = err.message;
    // AbortError and network errors: reconnect below
  } finally {
    clearTimeout(watchdog);
    if (connection === controller) connection = null;
  }
  return { got, why };
}

/** A line-fed SSE parser: calls `dispatch(eventName, parsedJson)` per complete event. */
export function sseParser(dispatch) {
  let event = "";
  let data = [];
  return (line) => {
    if (line === "") {
      if (data.length) {
        const parsed = parseJson(data.join("\n"));
        if (parsed !== undefined) safely(() => dispatch(event || "message", parsed));
      }
      event = "";
      data = [];
      return;
    }
    if (line.startsWith(":")) return; // a comment: keep-alive
    const colon = line.indexOf(":");
    const field = colon < 0 ? line : line.slice(0, colon);
    let value = colon < 0 ? "" : line.slice(colon + 1);
    if (value.startsWith(" ")) value = value.slice(1);
    if (field === "event") event = value;
    else if (field === "data") data.push(value);
  };
}

function parseJson(text) {
  try {
    return JSON.parse(text);
  } catch {
    return undefined;
  }
}

/** A bug while drawing one snapshot must not end the stream. */
function safely(work) {
  try {
    work();
  } catch (err) {
    console.warn("dashboard: could not show a snapshot:", err);
  }
}

function wait(ms) {
  return new Promise((resolve) => {
    const timer = setTimeout(resolve, ms);
    wakeUp = () => {
      clearTimeout(timer);
      resolve();
    };
  });
}
