"""What does Corral cost over llama.cpp itself?

Streams the same chat prompts (greedy, fixed seed, 128 tokens, same threads)
through these stacks and compares them in one run:

  in-process    llama-cpp-python's Llama.create_chat_completion(stream=True)
  engine        Corral's LlamaCppEngine in process (no HTTP, no Ray): shows how
                much of the difference is the engine loop and how much serving
  llama-server  llama-cpp-python's own server (python -m llama_cpp.server)
  corral        corral serve (Ray Serve ingress + replica), over HTTP

at concurrency 1 and 4, and prints decode tokens/s, time to first token (TTFT)
and failed streams, plus Corral's ratios to in-process. Targets: single-stream
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
import os
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


def in_process_stack(
    threads: int,
) -> tuple[Callable[[str, int], Stream], Callable[[], None], object]:
    from llama_cpp import Llama

    llm = Llama(
        str(starter_model_path()),
        n_ctx=N_CTX,
        n_threads=threads,
        n_threads_batch=threads,
        verbose=False,
    )
    lock = threading.Lock()  # one context, one sequence: callers take turns, as in a server

    def run(prompt: str, n_tokens: int) -> Stream:
        started = time.perf_counter()
        with lock:
            stream = llm.create_chat_completion(
                messages=[{"role": "user", "content": prompt}],
                max_tokens=MAX_TOKENS,
                temperature=0,
                seed=SEED,
                stream=True,
            )
            pieces = (
                (
                    c["choices"][0]["delta"].get("content") or "",
                    c["choices"][0]["finish_reason"] is not None,
                )
                for c in stream
            )
            return measure(pieces, started, n_tokens)

    return run, llm.close, llm


def engine_stack(threads: int) -> tuple[Callable[[str, int], Stream], Callable[[], None]]:
    from nodes.engine import (
        ChatMessage,
        EngineSpec,
        GenerateRequest,
        SamplingParams,
        TextDelta,
        load_engine,
    )

    engine = load_engine(
        EngineSpec(
            model=STARTER_MODEL, path=str(starter_model_path()), n_ctx=N_CTX, n_threads=threads
        )
    )
    lock = threading.Lock()

    def run(prompt: str, n_tokens: int) -> Stream:
        req = GenerateRequest(
            messages=(ChatMessage("user", prompt),),
            params=SamplingParams(max_tokens=MAX_TOKENS, temperature=0, seed=SEED),
        )
        started = time.perf_counter()
        with lock:
            events = engine.generate(engine.encode(req), req.params, threading.Event())
            pieces = ((e.text, False) if isinstance(e, TextDelta) else ("", True) for e in events)
            return measure(pieces, started, n_tokens)

    return run, engine.close


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


def start_corral_stack(threads: int):
    from cluster.server import start_corral
    from cluster.settings import load_settings

    settings = load_settings(
        host=f"127.0.0.1:{free_port()}",
        num_ctx=N_CTX,
        num_threads=threads,
        dashboard=False,
        state_dir=tempfile.mkdtemp(prefix="corral-bench-"),
    )
    return start_corral(settings)


# -- driver -----------------------------------------------------------------------------


def run_stack(
    name: str,
    run: Callable[[str, int], Stream],
    lengths: dict[str, int],
    reference: dict[str, str],
    rounds: int,
) -> list[Result]:
    for prompt in PROMPTS[:2]:  # warm up: load, caches, connections
        run(prompt, lengths[prompt])
    results = []
    for concurrency in (1, 4):
        result = Result(name, concurrency)
        jobs = [p for _ in range(rounds) for p in PROMPTS]
        started = time.perf_counter()
        with ThreadPoolExecutor(concurrency) as pool:
            streams = pool.map(lambda p: run(p, lengths[p]), jobs)
            for prompt, stream in zip(jobs, streams, strict=True):
                stream.same_text = stream.error is None and stream.text == reference[prompt]
                result.streams.append(stream)
        result.wall = time.perf_counter() - started
        results.append(result)
        print(
            f"  {name:13s} c={concurrency}: {result.summary()['decode_tps_median']:.1f} tok/s, "
            f"{result.failed} failed",
            flush=True,
        )
    return results


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--threads", type=int, default=default_threads())
    parser.add_argument(
        "--rounds", type=int, default=3, help="passes over the prompts per concurrency"
    )
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args()

    print(
        f"threads={args.threads} max_tokens={MAX_TOKENS} seed={SEED} prompts={len(PROMPTS)} "
        f"rounds={args.rounds}",
        flush=True,
    )
    run_inproc, close_inproc, llm = in_process_stack(args.threads)
    lengths, reference = {}, {}
    for prompt in PROMPTS:  # the reference text and token count of each prompt
        r = llm.create_chat_completion(
            messages=[{"role": "user", "content": prompt}],
            max_tokens=MAX_TOKENS,
            temperature=0,
            seed=SEED,
        )
        lengths[prompt] = r["usage"]["completion_tokens"]
        reference[prompt] = r["choices"][0]["message"]["content"]
    results = run_stack("in-process", run_inproc, lengths, reference, args.rounds)
    close_inproc()
    run_engine, close_engine = engine_stack(args.threads)
    results += run_stack("engine", run_engine, lengths, reference, args.rounds)
    close_engine()

    url, proc = start_llama_server(args.threads)
    try:
        results += run_stack("llama-server", sse_stack(url), lengths, reference, args.rounds)
    finally:
        proc.terminate()
        proc.wait(30)

    corral = start_corral_stack(args.threads)
    try:
        results += run_stack("corral", sse_stack(corral.url), lengths, reference, args.rounds)
    finally:
        corral.stop()

    report(results, args, lengths)


def report(results: list[Result], args: argparse.Namespace, lengths: dict[str, int]) -> None:
    rows = [r.summary() for r in results]
    base = {row["concurrency"]: row for row in rows if row["stack"] == "in-process"}
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
    for row in rows:
        b = base[row["concurrency"]]
        ratio = row["decode_tps_median"] / b["decode_tps_median"] if b["decode_tps_median"] else 0
        row["decode_ratio_vs_in_process"] = ratio
        row["ttft_ms_over_in_process"] = row["ttft_ms_median"] - b["ttft_ms_median"]
        print(" ".join(fmt.format(row[key]) for _, key, fmt in columns))
    corral1 = next(r for r in rows if r["stack"] == "corral" and r["concurrency"] == 1)
    corral4 = next(r for r in rows if r["stack"] == "corral" and r["concurrency"] == 4)
    engine1 = next(r for r in rows if r["stack"] == "engine" and r["concurrency"] == 1)
    serving_ratio = corral1["decode_tps_median"] / engine1["decode_tps_median"]
    serving_ttft = corral1["ttft_ms_median"] - engine1["ttft_ms_median"]
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
