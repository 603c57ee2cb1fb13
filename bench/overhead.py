"""What does Corral cost over llama.cpp itself?

Streams the same chat prompts (greedy, fixed seed, 128 tokens, same threads)
through these stacks and compares them in one run:

  in-process    llama-cpp-python's Llama.create_chat_completion(stream=True)
  engine        Corral's LlamaCppEngine in process (no HTTP, no Ray): shows how
                much of the difference is the engine loop and how much serving
  llama-server  llama-cpp-python's own server (python -m llama_cpp.server)
  corral        corral serve (Ray Serve ingress + replica), over HTTP

at concurrency 1 and 4, and prints decode tokens/s, time to first token (TTFT)
and failed streams, plus each stack's ratios to in-process. The stacks take
turns round by round, and ratios are medians over paired streams (same round,
same prompt), so a shared box getting busier or quieter affects both sides. Targets: single-stream
decode >= 0.95x in-process, TTFT <= in-process + 20 ms, no failed streams at
concurrency 4. Results go to bench/results/overhead-<time>.json.

A stream fails if it errors or ends without a finish reason. "same text" counts
streams whose text equals the in-process reference; greedy decoding makes
them equal up to llama.cpp's numerics, which differ slightly when a prompt is
evaluated in another batch split (a prefix-cache hit), so a few may differ.

Run: make bench   (or: .venv/bin/python bench/overhead.py --rounds 3)
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

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from nodes.llamacpp import default_threads  # noqa: E402
from nodes.models import STARTER_MODEL, starter_model_path  # noqa: E402

PROMPTS = [
    "Write a long story about a lighthouse keeper who finds a message in a bottle.",
    "Explain in detail how a steam engine works, step by step.",
    "Describe a walk through a busy market in a medieval town.",
    "Give a detailed history of the bicycle, from its invention to today.",
]
MAX_TOKENS = 128
SEED = 42
N_CTX = 2048


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
    with cpu_kernels.extra_bufts(cpu_kernels.current().extra_bufts):
        llm = Llama(
            str(starter_model_path()), n_ctx=N_CTX, n_threads=threads, n_threads_batch=threads,
            verbose=False,
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

    spec = EngineSpec(STARTER_MODEL, str(starter_model_path()), n_ctx=N_CTX, n_threads=threads)
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


def _in_process_worker(conn: Connection, kind: str, threads: int) -> None:
    """Child process: all llama.cpp work on its main thread, one request at a time.

    A process of its own per stack, because llama.cpp's OpenMP keeps a worker
    team per calling thread and two teams in one process slow each other down.
    """
    pieces, reference = IN_PROCESS[kind](threads)
    conn.send({prompt: reference(prompt) for prompt in PROMPTS})
    while (job := conn.recv()) is not None:
        prompt, n_tokens, submitted = job
        conn.send(measure(pieces(prompt), submitted, n_tokens))


class InProcessStack:
    """A stack living in a child process; callers queue for it, as for a server."""

    def __init__(self, kind: str, threads: int) -> None:
        ctx = multiprocessing.get_context("spawn")
        self._conn, child = ctx.Pipe()
        self._proc = ctx.Process(target=_in_process_worker, args=(child, kind, threads))
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
    client = httpx.Client(timeout=120)

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
        started = time.perf_counter()
        try:
            with client.stream("POST", f"{url}/v1/chat/completions", json=body) as r:
                if r.status_code != 200:
                    return Stream(error=f"HTTP {r.status_code}")
                return measure(_sse_pieces(r.iter_lines()), started, n_tokens)
        except (httpx.HTTPError, StreamError) as exc:
            return Stream(error=f"{type(exc).__name__}: {exc}")

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


def wait_http(url: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            httpx.get(url, timeout=2)
            return
        except httpx.HTTPError:
            time.sleep(0.3)
    raise RuntimeError(f"{url} did not come up")


def start_llama_server(threads: int) -> tuple[str, subprocess.Popen]:
    port = free_port()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "llama_cpp.server",
            "--model",
            str(starter_model_path()),
            "--model_alias",
            STARTER_MODEL,
            "--n_ctx",
            str(N_CTX),
            "--n_threads",
            str(threads),
            "--n_threads_batch",
            str(threads),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    wait_http(url + "/v1/models")
    return url, proc


def start_corral_stack(threads: int, stream_interval: float | None) -> tuple[str, subprocess.Popen]:
    """``corral serve`` in its own process, as users run it (no Ray in this process)."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("CORRAL_")}
    env.update(CORRAL_HOST=f"127.0.0.1:{port}", CORRAL_STATE_DIR=tempfile.mkdtemp(prefix="corral-"))
    if stream_interval is not None:
        env["CORRAL_STREAM_INTERVAL"] = str(stream_interval)
    corral = Path(sys.executable).with_name("corral")
    proc = subprocess.Popen(
        [str(corral), "serve", "--no-dashboard", "--num-threads", str(threads),
         "--num-ctx", str(N_CTX)],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    wait_http(url + "/")
    return url, proc


def stop(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGINT)  # corral serve shuts Ray down on SIGINT
    try:
        proc.wait(60)
    except subprocess.TimeoutExpired:
        proc.kill()


# -- driver -----------------------------------------------------------------------------


def run_batch(
    run: Callable[[str, int], Stream], concurrency: int, lengths: dict[str, int], result: Result
) -> None:
    """Every prompt once, ``concurrency`` streams at a time, into ``result``."""
    started = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        streams = pool.map(lambda p: run(p, lengths[p]), PROMPTS)
        for prompt, stream in zip(PROMPTS, streams, strict=True):
            stream.prompt = prompt
            result.streams.append(stream)
    result.wall += time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--threads", type=int, default=default_threads())
    parser.add_argument(
        "--rounds", type=int, default=3, help="passes over the prompts per stack and concurrency"
    )
    parser.add_argument(
        "--stream-interval", type=float, help="Corral's stream_interval (default: its own)"
    )
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args()

    print(
        f"threads={args.threads} max_tokens={MAX_TOKENS} seed={SEED} prompts={len(PROMPTS)} "
        f"rounds={args.rounds}",
        flush=True,
    )
    in_process = InProcessStack("in-process", args.threads)
    engine = InProcessStack("engine", args.threads)
    # Greedy decoding: the text (and token count) every stack should produce.
    reference = {p: text for p, (text, _) in in_process.reference.items()}
    lengths = {p: n for p, (_, n) in in_process.reference.items()}
    server_url, server = start_llama_server(args.threads)
    corral_url, corral = start_corral_stack(args.threads, args.stream_interval)
    stacks = {
        "in-process": in_process,
        "engine": engine,
        "llama-server": sse_stack(server_url),
        "corral": sse_stack(corral_url),
    }
    try:
        for run in stacks.values():  # warm up: load, caches, connections
            for prompt in PROMPTS[:2]:
                run(prompt, lengths[prompt])
        # Round-robin over the stacks, so that a box that gets busier or quieter
        # during the run affects every stack alike.
        results = {(n, c): Result(n, c) for c in (1, 4) for n in stacks}
        for concurrency in (1, 4):
            for i in range(args.rounds):
                for name, run in stacks.items():
                    run_batch(run, concurrency, lengths, results[name, concurrency])
                print(f"  concurrency {concurrency}: round {i + 1}/{args.rounds} done", flush=True)
    finally:
        stop(corral)
        stop(server)
        engine.close()
        in_process.close()
    for result in results.values():
        for stream in result.streams:
            stream.same_text = stream.error is None and stream.text == reference[stream.prompt]
    report(list(results.values()), args, lengths)


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


def report(results: list[Result], args: argparse.Namespace, lengths: dict[str, int]) -> None:
    rows = sorted((r.summary() for r in results), key=lambda r: r["concurrency"])
    base = {r.concurrency: r for r in results if r.stack == "in-process"}
    print()
    columns = [  # header, key, format (the header sets the width)
        ("stack        ", "stack", "{:13s}"),
        ("conc", "concurrency", "{:>4d}"),
        ("streams", "streams", "{:>7d}"),
        ("failed", "failed", "{:>6d}"),
        ("same", "same_text", "{:>4d}"),
        ("decode tok/s", "decode_tps_median", "{:>12.1f}"),
        ("TTFT ms", "ttft_ms_median", "{:>7.1f}"),
        ("agg tok/s", "aggregate_tps", "{:>9.1f}"),
        ("decode x", "decode_ratio_vs_in_process", "{:>8.3f}"),
        ("TTFT +ms", "ttft_ms_over_in_process", "{:>+8.1f}"),
    ]
    print(" ".join(header for header, _, _ in columns))
    found = {(r.stack, r.concurrency): r for r in results}
    for row in rows:
        ratio, extra = paired(found[row["stack"], row["concurrency"]], base[row["concurrency"]])
        row["decode_ratio_vs_in_process"], row["ttft_ms_over_in_process"] = ratio, extra
        print(" ".join(fmt.format(row[key]) for _, key, fmt in columns))
    corral1 = next(r for r in rows if r["stack"] == "corral" and r["concurrency"] == 1)
    corral4 = next(r for r in rows if r["stack"] == "corral" and r["concurrency"] == 4)
    serving_ratio, serving_ttft = paired(found["corral", 1], found["engine", 1])
    print(
        f"\ncorral vs its own engine in process (serving cost alone): decode x{serving_ratio:.3f}, "
        f"TTFT {serving_ttft:+.1f} ms"
    )
    targets = {
        "decode_ratio_ge_0.95": corral1["decode_ratio_vs_in_process"] >= 0.95,
        "ttft_within_20ms": corral1["ttft_ms_over_in_process"] <= 20,
        "no_failed_streams_at_4": corral4["failed"] == 0,
    }
    print()
    for name, ok in targets.items():
        print(f"  {'PASS' if ok else 'FAIL'}  {name}")
    args.out.mkdir(parents=True, exist_ok=True)
    out = args.out / f"overhead-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.write_text(
        json.dumps(
            {
                "threads": args.threads,
                "max_tokens": MAX_TOKENS,
                "seed": SEED,
                "rounds": args.rounds,
                "stream_interval": args.stream_interval,
                "cpu_count": os.cpu_count(),
                "tokens_per_prompt": list(lengths.values()),
                "results": rows,
                "targets": targets,
                "corral_vs_engine": {"decode_ratio": serving_ratio, "ttft_ms_over": serving_ttft},
            },
            indent=2,
        )
    )
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
