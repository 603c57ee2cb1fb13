"""What does Corral cost over llama.cpp's own server, one stream and several at once?

Streams the same chat prompts (greedy, fixed seed, 128 tokens, same threads) through
these stacks and compares them in one run:

  llama-server     llama.cpp's own server, built from the llama.cpp that the installed
                   llama-cpp-python vendors (same commit; bench/_llama_server.py builds
                   it once and caches it): THE baseline every ratio is against
  corral           corral serve (Ray Serve ingress + replica), over HTTP, one replica
                   with `parallel: NP` in its models.yaml entry
  engine           Corral's engine in process (no HTTP, no Ray), one request at a
                   time: how much of the difference is the engine and how much serving
  in-process       llama-cpp-python's Llama.create_chat_completion(stream=True)
  llama-cpp-python llama-cpp-python's own server (python -m llama_cpp.server)

(default: llama-server, corral, engine; the in-process stacks run one request at a
time, so they are measured at concurrency 1 only), at concurrency 1, 4 and 8
(``--concurrency``). Each server runs NP slots: NP = the concurrency, and 4 for
concurrency 1 (as issue 16's table did), so llama-server runs `-np NP -c 2048*NP`
and Corral `parallel: NP, context: 2048*NP` (2048 cells per slot in both). Servers
are started once per NP. llama.cpp's extra buffer types (repack) are the ones
Corral's engine uses on this box (nodes/cpu_kernels.py's probe): when they are off,
llama-server gets `--no-repack`.

Printed per stack and concurrency: per-stream decode tokens/s, TTFT p50, total
tokens/s (all streams' tokens over the wall time), failed streams, and ratios to
llama-server in the same run. The stacks take turns round by round, and the decode
and TTFT ratios are medians over paired streams (same round, same prompt), so a
shared box getting busier or quieter affects both sides. Targets (issue 16):
single-stream decode >= 0.95x llama-server, TTFT <= llama-server + 20 ms; at 4
concurrent streams on one replica, total tokens/s >= 1.0x llama-server -np 4 and
TTFT p50 <= 2x llama-server's; no failed streams. Results go to
bench/results/overhead-<time>.json.

A stream fails if it errors or ends without a finish reason. "same" counts streams
whose text equals the in-process reference; greedy decoding makes them equal up to
llama.cpp's numerics, which differ slightly when a prompt is evaluated in another
batch split (a prefix-cache hit, other streams in the batch), so some may differ.

Run: make bench   (or: .venv/bin/python bench/overhead.py --rounds 3)
     .venv/bin/python bench/overhead.py --rounds 1 --concurrency 1 4   (a quick look)
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path

import httpx
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import _llama_server  # noqa: E402

from nodes.llamacpp import default_threads  # noqa: E402
from nodes.models import STARTER_MODEL, starter_model_path  # noqa: E402

PROMPTS = [
    "Write a long story about a lighthouse keeper who finds a message in a bottle.",
    "Explain in detail how a steam engine works, step by step.",
    "Describe a walk through a busy market in a medieval town.",
    "Give a detailed history of the bicycle, from its invention to today.",
    "Write a letter from a sailor to his family, describing a storm at sea.",
    "Explain how bread is made, from the wheat field to the bakery.",
    "Describe the life of a honeybee colony through one year.",
    "Tell the story of a small village that builds its first bridge.",
]
MAX_TOKENS = 128
SEED = 42
N_CTX = 2048  # cells per slot
BASELINE = "llama-server"
STACKS = ("llama-server", "corral", "engine", "in-process", "llama-cpp-python")
SERVERS = ("llama-server", "corral", "llama-cpp-python")  # the others run in process
DEFAULT_STACKS = ("llama-server", "corral", "engine")


def slots_for(concurrency: int) -> int:
    """The servers' slots (-np, ``parallel``) at ``concurrency``: 4 for one stream."""
    return 4 if concurrency == 1 else concurrency


class StreamError(Exception):
    """The server sent an error event in the middle of a stream."""


@dataclass
class Stream:
    """One measured stream."""

    ttft: float = 0.0  # seconds from request to first text
    decode_tps: float = 0.0  # tokens/s after the first token
    tokens: int = 0
    text: str = ""
    error: str | None = None
    prompt: str = ""
    same_text: bool = False


@dataclass
class Result:
    stack: str
    concurrency: int
    streams: list[Stream] = field(default_factory=list)
    wall: float = 0.0

    @property
    def ok(self) -> list[Stream]:
        return [s for s in self.streams if s.error is None]

    @property
    def failed(self) -> int:
        return len(self.streams) - len(self.ok)

    def summary(self) -> dict:
        ok = self.ok
        return {
            "stack": self.stack,
            "concurrency": self.concurrency,
            "streams": len(self.streams),
            "failed": self.failed,
            "same_text": sum(s.same_text for s in ok),
            "decode_tps_median": statistics.median(s.decode_tps for s in ok) if ok else 0.0,
            "ttft_ms_median": 1000 * statistics.median(s.ttft for s in ok) if ok else 0.0,
            "aggregate_tps": sum(s.tokens for s in ok) / self.wall if self.wall else 0.0,
            "errors": sorted({s.error for s in self.streams if s.error}),
        }


def measure(chunks: Iterator[tuple[str, bool]], started: float, n_tokens: int) -> Stream:
    """Time a stream of (text, finished) pieces; ``n_tokens`` is its known length."""
    s = Stream()
    first = last = None
    finished = False
    for text, done in chunks:
        now = time.perf_counter()
        if text:
            first = first or now
            last = now
            s.text += text
        finished = finished or done
    if first is None or not finished:
        s.error = "stream ended without text" if first is None else "no finish reason"
        return s
    s.ttft = first - started
    s.tokens = n_tokens
    s.decode_tps = (n_tokens - 1) / (last - first) if last > first else 0.0
    return s


# -- the stacks ----------------------------------------------------------------------


Pieces = Callable[[str], Iterator[tuple[str, bool]]]
Reference = Callable[[str], tuple[str, int]]


def llama_stack(threads: int) -> tuple[Pieces, Reference]:
    """llama-cpp-python's own streaming chat: the baseline everything is compared to."""
    from llama_cpp import Llama

    from nodes import cpu_kernels

    # The CPU kernels Corral's engine uses on this box: like with like, and no AMX crash.
    # Flash attention on, as llama-server's and Corral's "auto" turn it on for the CPU:
    # it changes the numerics, so greedy texts compare only with it alike.
    with cpu_kernels.extra_bufts(cpu_kernels.current().extra_bufts):
        llm = Llama(
            str(starter_model_path()), n_ctx=N_CTX, n_threads=threads, n_threads_batch=threads,
            flash_attn=True, verbose=False,
        )  # fmt: skip
    args = {"max_tokens": MAX_TOKENS, "temperature": 0, "seed": SEED}

    def pieces(prompt: str) -> Iterator[tuple[str, bool]]:
        messages = [{"role": "user", "content": prompt}]
        for c in llm.create_chat_completion(messages=messages, stream=True, **args):
            choice = c["choices"][0]
            yield choice["delta"].get("content") or "", choice["finish_reason"] is not None

    def reference(prompt: str) -> tuple[str, int]:
        r = llm.create_chat_completion(messages=[{"role": "user", "content": prompt}], **args)
        return r["choices"][0]["message"]["content"], r["usage"]["completion_tokens"]

    return pieces, reference


def engine_stack(threads: int) -> tuple[Pieces, Reference]:
    """Corral's LlamaCppEngine, called directly: no replica, no Ray, no HTTP."""
    from nodes.engine import (
        ChatMessage,
        EngineSpec,
        Finished,
        GenerateRequest,
        SamplingParams,
        TextDelta,
        load_engine,
    )

    # the shape Corral's replica has at one stream: its slots, N_CTX cells each
    slots = slots_for(1)
    spec = EngineSpec(
        STARTER_MODEL, str(starter_model_path()), n_ctx=N_CTX * slots, n_threads=threads,
        parallel=slots,
    )  # fmt: skip
    engine = load_engine(spec)
    params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0, seed=SEED)

    def events(prompt: str) -> Iterator:
        req = GenerateRequest(messages=(ChatMessage("user", prompt),), params=params)
        return engine.generate(engine.encode(req), params, threading.Event())

    def pieces(prompt: str) -> Iterator[tuple[str, bool]]:
        for e in events(prompt):
            yield (e.text, False) if isinstance(e, TextDelta) else ("", True)

    def reference(prompt: str) -> tuple[str, int]:
        all_events = list(events(prompt))
        done = next(e for e in all_events if isinstance(e, Finished))
        text = "".join(e.text for e in all_events if isinstance(e, TextDelta))
        return text, done.usage.completion_tokens

    return pieces, reference


IN_PROCESS = {"in-process": llama_stack, "engine": engine_stack}


def _in_process_worker(conn: Connection, kind: str, threads: int, with_reference: bool) -> None:
    """Child process: all llama.cpp work on its main thread, one request at a time.

    A process of its own per stack, because llama.cpp's OpenMP keeps a worker
    team per calling thread and two teams in one process slow each other down.
    """
    pieces, reference = IN_PROCESS[kind](threads)
    conn.send({prompt: reference(prompt) for prompt in PROMPTS} if with_reference else {})
    while (job := conn.recv()) is not None:
        prompt, n_tokens, submitted = job
        conn.send(measure(pieces(prompt), submitted, n_tokens))


class InProcessStack:
    """A stack living in a child process; callers queue for it, as for a server."""

    def __init__(self, kind: str, threads: int, reference: bool = False) -> None:
        ctx = multiprocessing.get_context("spawn")
        self._conn, child = ctx.Pipe()
        self._proc = ctx.Process(target=_in_process_worker, args=(child, kind, threads, reference))
        self._proc.start()
        self.reference: dict[str, tuple[str, int]] = self._conn.recv()  # text, tokens
        self._lock = threading.Lock()

    def __call__(self, prompt: str, n_tokens: int) -> Stream:
        submitted = time.perf_counter()  # CLOCK_MONOTONIC: comparable across processes
        with self._lock:
            self._conn.send((prompt, n_tokens, submitted))
            return self._conn.recv()

    def close(self) -> None:
        self._conn.send(None)
        self._proc.join(30)


def sse_stack(url: str) -> Callable[[str, int], Stream]:
    # llama-server closes a connection idle for 5 s; one reused after that fails. So no
    # stack reuses a connection idle for more than 2 s (another stack's turn).
    client = httpx.Client(timeout=120, limits=httpx.Limits(keepalive_expiry=2))

    def run(prompt: str, n_tokens: int) -> Stream:
        body = {
            "model": STARTER_MODEL,
            "messages": [{"role": "user", "content": prompt}],
            "max_tokens": MAX_TOKENS,
            "temperature": 0,
            "seed": SEED,
            "stream": True,
            # llama_cpp.server defaults to 1.1; the library (and so the reference) to 1.0.
            "repeat_penalty": 1.0,
        }
        for attempt in (1, 2):
            started = time.perf_counter()
            answered = False
            try:
                with client.stream("POST", f"{url}/v1/chat/completions", json=body) as r:
                    answered = True
                    if r.status_code != 200:
                        return Stream(error=f"HTTP {r.status_code}")
                    return measure(_sse_pieces(r.iter_lines()), started, n_tokens)
            except httpx.RemoteProtocolError as exc:
                # Still, a kept-alive connection closed by the server just as it was
                # reused fails before any answer (seen with llama-server): the request
                # never ran, so it is sent again once, on a new connection, and timed anew.
                if answered or attempt == 2:
                    return Stream(error=f"{type(exc).__name__}: {exc}")
            except (httpx.HTTPError, StreamError) as exc:
                return Stream(error=f"{type(exc).__name__}: {exc}")
        raise AssertionError("unreachable")

    return run


def _sse_pieces(lines: Iterator[str]) -> Iterator[tuple[str, bool]]:
    for line in lines:
        if not line.startswith("data: ") or line == "data: [DONE]":
            continue
        data = json.loads(line[6:])
        if "error" in data:
            raise StreamError(data["error"].get("message", "error event"))
        for choice in data.get("choices", []):
            yield (
                (choice.get("delta") or {}).get("content") or "",
                choice.get("finish_reason") is not None,
            )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, proc: subprocess.Popen | None = None, timeout: float = 180) -> None:
    """Until ``url`` answers 200; an error at once if ``proc`` exits meanwhile."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{proc.args[0]} exited ({proc.returncode}) before {url} answered")
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    raise RuntimeError(f"{url} did not come up")


@dataclass
class Server:
    """A server process and its address; ``stop()`` ends it (SIGINT, then SIGKILL)."""

    name: str
    url: str
    proc: subprocess.Popen
    log: Path | None = None

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)  # corral serve shuts Ray down on SIGINT
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


def extra_bufts() -> bool:
    """Whether Corral's engine uses llama.cpp's extra buffer types (repack) on this box."""
    from nodes import cpu_kernels

    return cpu_kernels.current().extra_bufts


def start_llama_server(binary: Path, threads: int, slots: int, repack: bool) -> Server:
    """llama.cpp's llama-server with ``slots`` slots of N_CTX cells each."""
    port = free_port()
    command = [
        str(binary), "-m", str(starter_model_path()), "-t", str(threads),
        "-c", str(N_CTX * slots), "-np", str(slots), "--host", "127.0.0.1", "--port", str(port),
    ]  # fmt: skip
    if not repack:
        command.append("--no-repack")  # llama.cpp's extra buffer types, as Corral's engine
    log = Path(tempfile.mkstemp(prefix="llama-server-", suffix=".log")[1])
    with log.open("w") as out:
        proc = subprocess.Popen(
            command, env=_llama_server.server_env(binary), stdout=out, stderr=subprocess.STDOUT
        )
    server = Server("llama-server", f"http://127.0.0.1:{port}", proc, log)
    try:
        wait_http(server.url + "/health", proc)
    except BaseException:
        server.stop()
        print(log.read_text()[-2000:], file=sys.stderr)
        raise
    return server


def start_llama_cpp_python_server(threads: int, slots: int) -> Server:
    """llama-cpp-python's own server (it has no slots: one request at a time)."""
    del slots
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "llama_cpp.server", "--model", str(starter_model_path()),
         "--model_alias", STARTER_MODEL, "--n_ctx", str(N_CTX), "--n_threads", str(threads),
         "--n_threads_batch", str(threads), "--host", "127.0.0.1", "--port", str(port)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    server = Server("llama-cpp-python", f"http://127.0.0.1:{port}", proc)
    try:
        wait_http(server.url + "/v1/models", proc)
    except BaseException:
        server.stop()
        raise
    return server


def has_parallel_field() -> bool:
    """models.yaml's ``parallel`` (slots per replica) exists in this Corral."""
    from cluster.spec import ModelSpec

    return "parallel" in ModelSpec.model_fields


def corral_models(threads: int, slots: int) -> dict:
    """The models.yaml Corral runs: the starter model, one replica with ``slots`` slots."""
    entry = {
        "name": STARTER_MODEL,
        "context": N_CTX,
        "threads": threads,
        "replicas": 1,
        "keep_alive": -1,
    }
    if has_parallel_field():
        entry.update(parallel=slots, context=N_CTX * slots)  # N_CTX cells per slot
    return {"models": [entry]}


def start_corral(threads: int, slots: int, stream_interval: float | None) -> Server:
    """``corral serve`` in its own process, as users run it (no Ray in this process), then
    ``corral apply`` of a models.yaml with ``parallel: slots``."""
    port = free_port()
    state = Path(tempfile.mkdtemp(prefix="corral-"))
    env = {k: v for k, v in os.environ.items() if not k.startswith("CORRAL_")}
    env.update(CORRAL_HOST=f"127.0.0.1:{port}", CORRAL_STATE_DIR=str(state))
    if stream_interval is not None:
        env["CORRAL_STREAM_INTERVAL"] = str(stream_interval)
    corral = Path(sys.executable).with_name("corral")
    log = state / "serve.log"
    with log.open("w") as out:
        proc = subprocess.Popen(
            [str(corral), "serve", "--no-dashboard", "--num-threads", str(threads),
             "--num-ctx", str(N_CTX)],
            env=env, stdout=out, stderr=subprocess.STDOUT,
        )  # fmt: skip
    server = Server("corral", f"http://127.0.0.1:{port}", proc, log)
    try:
        wait_http(server.url + "/", proc)
        models = state / "bench.models.yaml"
        models.write_text(yaml.safe_dump(corral_models(threads, slots), sort_keys=False))
        done = subprocess.run(
            [str(corral), "apply", "-f", str(models), "--state-dir", str(state)],
            env=env, capture_output=True, text=True, timeout=600,
        )  # fmt: skip
        if done.returncode:
            raise RuntimeError(f"corral apply failed: {done.stdout[-1500:]}{done.stderr[-1500:]}")
    except BaseException:
        server.stop()
        print(log.read_text()[-2000:], file=sys.stderr)
        raise
    return server


# -- driver -----------------------------------------------------------------------------


def prompts_for(concurrency: int) -> list[str]:
    """One batch: every prompt once, more (cycled) if the concurrency asks for more."""
    return [PROMPTS[i % len(PROMPTS)] for i in range(max(len(PROMPTS), concurrency))]


def run_batch(
    run: Callable[[str, int], Stream], concurrency: int, lengths: dict[str, int], result: Result
) -> None:
    """One batch, ``concurrency`` streams at a time (closed loop), into ``result``."""
    prompts = prompts_for(concurrency)
    started = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        streams = pool.map(lambda p: run(p, lengths[p]), prompts)
        for prompt, stream in zip(prompts, streams, strict=True):
            stream.prompt = prompt
            result.streams.append(stream)
    result.wall += time.perf_counter() - started


def start_servers(
    names: list[str], args: argparse.Namespace, slots: int, binary: Path | None, repack: bool
) -> dict[str, Server]:
    """The servers of ``names`` with ``slots`` slots; all stopped again if one fails."""
    servers: dict[str, Server] = {}
    try:
        for name in names:
            print(f"  starting {name} with {slots} slots", flush=True)
            if name == "llama-server":
                servers[name] = start_llama_server(binary, args.threads, slots, repack)
            elif name == "corral":
                servers[name] = start_corral(args.threads, slots, args.stream_interval)
            else:
                servers[name] = start_llama_cpp_python_server(args.threads, slots)
    except BaseException:
        stop_all(servers.values())
        raise
    return servers


def stop_all(servers) -> None:
    for server in servers:
        try:
            server.stop()
        except Exception as exc:  # noqa: BLE001 - stop the others anyway
            print(f"  could not stop {server.name}: {exc}", file=sys.stderr)


def measure_group(
    concurrencies: list[int],
    stacks: dict[str, Callable[[str, int], Stream]],
    lengths: dict[str, int],
    args: argparse.Namespace,
    results: dict[tuple[str, int], Result],
) -> None:
    """Warm up, then ``args.rounds`` rounds of every stack at each of ``concurrencies``."""
    for run in stacks.values():  # load, caches, connections
        for prompt in PROMPTS[:2]:
            run(prompt, lengths[prompt])
    for concurrency in concurrencies:
        for i in range(args.rounds):
            # Round-robin over the stacks, so that a box that gets busier or quieter
            # during the run affects every stack alike.
            for name, run in stacks.items():
                if name in SERVERS or concurrency == 1:
                    result = results.setdefault((name, concurrency), Result(name, concurrency))
                    run_batch(run, concurrency, lengths, result)
            print(f"  concurrency {concurrency}: round {i + 1}/{args.rounds} done", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--threads", type=int, default=default_threads())
    parser.add_argument(
        "--rounds", type=int, default=3, help="passes over the prompts per stack and concurrency"
    )
    parser.add_argument(
        "--concurrency", type=int, nargs="+", default=[1, 4, 8], help="streams at once"
    )
    parser.add_argument(
        "--stacks", nargs="+", default=list(DEFAULT_STACKS), choices=STACKS, metavar="STACK",
        help=f"from {', '.join(STACKS)} (llama-server always runs: it is the baseline)",
    )  # fmt: skip
    parser.add_argument(
        "--stream-interval", type=float, help="Corral's stream_interval (default: its own)"
    )
    parser.add_argument("--build-dir", type=Path, help="see bench/_llama_server.py")
    parser.add_argument("--jobs", type=int, default=2, help="compile jobs for llama-server")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args()
    names = [BASELINE, *(s for s in args.stacks if s != BASELINE)]
    binary = _llama_server.build(args.build_dir, args.jobs)
    repack = extra_bufts()
    print(
        f"threads={args.threads} max_tokens={MAX_TOKENS} seed={SEED} prompts={len(PROMPTS)} "
        f"rounds={args.rounds} concurrency={args.concurrency} stacks={names} "
        f"extra buffer types={'on' if repack else 'off (llama-server --no-repack)'} "
        f"corral parallel field={'yes' if has_parallel_field() else 'NO (one slot, old engine)'}",
        flush=True,
    )
    results: dict[tuple[str, int], Result] = {}
    in_process: dict[str, InProcessStack] = {}
    try:
        # The reference child always runs: it gives every prompt's text and token count.
        in_process["in-process"] = InProcessStack("in-process", args.threads, reference=True)
        if "engine" in names and 1 in args.concurrency:
            in_process["engine"] = InProcessStack("engine", args.threads)
        reference = {p: text for p, (text, _) in in_process["in-process"].reference.items()}
        lengths = {p: n for p, (_, n) in in_process["in-process"].reference.items()}
        groups: dict[int, list[int]] = {}
        for c in sorted(set(args.concurrency)):
            groups.setdefault(slots_for(c), []).append(c)
        for slots, concurrencies in groups.items():
            servers = start_servers([n for n in names if n in SERVERS], args, slots, binary, repack)
            try:
                stacks: dict[str, Callable[[str, int], Stream]] = {}
                for name in names:
                    if name in servers:
                        stacks[name] = sse_stack(servers[name].url)
                    elif name in in_process and 1 in concurrencies:
                        stacks[name] = in_process[name]
                measure_group(concurrencies, stacks, lengths, args, results)
            finally:
                stop_all(servers.values())
    finally:
        for stack in in_process.values():
            stack.close()
    for result in results.values():
        for stream in result.streams:
            stream.same_text = stream.error is None and stream.text == reference[stream.prompt]
    report(list(results.values()), args, lengths, binary, repack)


def paired(stack: Result, base: Result) -> tuple[float, float]:
    """``stack`` against ``base`` stream by stream (same round, same prompt): the median
    decode ratio and the median TTFT difference in ms. Pairing cancels the drift of a
    shared, noisy box between rounds, which comparing two medians would not."""
    pairs = [
        (s, b)
        for s, b in zip(stack.streams, base.streams, strict=True)
        if s.error is None and b.error is None and b.decode_tps
    ]
    if not pairs:
        return 0.0, 0.0
    ratio = statistics.median(s.decode_tps / b.decode_tps for s, b in pairs)
    extra = 1000 * statistics.median(s.ttft - b.ttft for s, b in pairs)
    return ratio, extra


def compare(results: list[Result]) -> list[dict]:
    """Each result's summary with its ratios to llama-server at the same concurrency."""
    found = {(r.stack, r.concurrency): r for r in results}
    rows = []
    for r in sorted(results, key=lambda r: (r.concurrency, STACKS.index(r.stack))):
        row = {**r.summary(), "slots": slots_for(r.concurrency)}
        base = found.get((BASELINE, r.concurrency))
        b = base.summary() if base else None
        row["decode_x"], row["ttft_ms_over"] = paired(r, base) if base else (0.0, 0.0)
        row["total_tps_x"] = (
            row["aggregate_tps"] / b["aggregate_tps"] if b and b["aggregate_tps"] else 0.0
        )
        row["ttft_x"] = (
            row["ttft_ms_median"] / b["ttft_ms_median"] if b and b["ttft_ms_median"] else 0.0
        )
        rows.append(row)
    return rows


def targets_of(rows: list[dict]) -> dict[str, bool]:
    """Issue 16's targets for Corral, those the run measured."""
    corral = {r["concurrency"]: r for r in rows if r["stack"] == "corral"}
    targets = {}
    if 1 in corral:
        targets["1 stream: decode >= 0.95x llama-server"] = corral[1]["decode_x"] >= 0.95
        targets["1 stream: TTFT <= llama-server + 20 ms"] = corral[1]["ttft_ms_over"] <= 20
    if 4 in corral:
        targets["4 streams: total tok/s >= 1.0x llama-server -np 4"] = corral[4]["total_tps_x"] >= 1
        targets["4 streams: TTFT p50 <= 2x llama-server's"] = corral[4]["ttft_x"] <= 2
    if corral:
        targets["no failed streams"] = all(r["failed"] == 0 for r in corral.values())
    return targets


COLUMNS = [  # header, key, format (the header sets the width)
    ("stack           ", "stack", "{:16s}"),
    ("conc", "concurrency", "{:>4d}"),
    ("np", "slots", "{:>2d}"),
    ("streams", "streams", "{:>7d}"),
    ("failed", "failed", "{:>6d}"),
    ("same", "same_text", "{:>4d}"),
    ("decode tok/s", "decode_tps_median", "{:>12.1f}"),
    ("TTFT p50 ms", "ttft_ms_median", "{:>11.1f}"),
    ("total tok/s", "aggregate_tps", "{:>11.1f}"),
    ("decode x", "decode_x", "{:>8.3f}"),
    ("TTFT +ms", "ttft_ms_over", "{:>+8.1f}"),
    ("total x", "total_tps_x", "{:>7.3f}"),
    ("TTFT x", "ttft_x", "{:>6.2f}"),
]


def report(
    results: list[Result],
    args: argparse.Namespace,
    lengths: dict[str, int],
    binary: Path,
    repack: bool,
) -> None:
    rows = compare(results)
    print()
    print(" ".join(header for header, _, _ in COLUMNS))
    for row in rows:
        print(" ".join(fmt.format(row[key]) for _, key, fmt in COLUMNS))
    print(
        "\nx and +ms: against llama-server at the same concurrency in this run (decode x and "
        "TTFT +ms: medians over paired streams; total x and TTFT x: ratios of the totals and "
        "p50s). np: slots of llama-server (-np) and Corral (parallel)."
    )
    found = {(r.stack, r.concurrency): r for r in results}
    serving = None
    if ("corral", 1) in found and ("engine", 1) in found:
        ratio, extra = paired(found["corral", 1], found["engine", 1])
        serving = {"decode_ratio": ratio, "ttft_ms_over": extra}
        print(
            f"corral vs its own engine in process (serving cost alone): decode x{ratio:.3f}, "
            f"TTFT {extra:+.1f} ms"
        )
    targets = targets_of(rows)
    print()
    for name, ok in targets.items():
        print(f"  {'PASS' if ok else 'FAIL'}  {name}")
    args.out.mkdir(parents=True, exist_ok=True)
    out = args.out / f"overhead-{time.strftime('%Y%m%d-%H%M%S')}.json"
    build_info = binary.parent / "BUILD_INFO.json"
    out.write_text(
        json.dumps(
            {
                "threads": args.threads,
                "max_tokens": MAX_TOKENS,
                "seed": SEED,
                "rounds": args.rounds,
                "concurrency": args.concurrency,
                "slots": {c: slots_for(c) for c in args.concurrency},
                "ctx_per_slot": N_CTX,
                "stream_interval": args.stream_interval,
                "extra_bufts": repack,
                "corral_parallel_field": has_parallel_field(),
                "llama_server": json.loads(build_info.read_text()) if build_info.exists() else {},
                "cpu_count": os.cpu_count(),
                "tokens_per_prompt": list(lengths.values()),
                "results": rows,
                "targets": targets,
                "corral_vs_engine": serving,
            },
            indent=2,
        )
    )
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
