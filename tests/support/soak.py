"""A soak: closed-loop streaming clients against one model for a while, and the memory of
every Ray process meanwhile. ``tests/reliability/test_soak.py`` and ``bench/soak.py`` run
it; only 127.0.0.1 is ever sent to, and both the clients and the time are bounded.

Each client sends a streamed chat completion, reads it to the end and sends the next.
How each request ended is one of: ``ok`` (``[DONE]`` after the text), ``429`` or
``503`` with a Retry-After header (the client waits that long, at most 2 s, as the
OpenAI SDKs do), or a failure: ``<status> without Retry-After``, ``error event``
(the stream broke), ``no [DONE]``, or the transport error's name.
"""

from __future__ import annotations

import asyncio
import json
import statistics
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import httpx
import psutil

MIB = 1024**2
RETRYABLE = (429, 503)


@dataclass
class Outcome:
    kind: str  # "ok", "429", "503" or a failure (see the module docstring)
    seconds: float  # from sending the request to the end of its answer
    tokens: int = 0  # completion tokens, from the final usage chunk


@dataclass
class SoakResult:
    clients: int
    seconds: float
    outcomes: list[Outcome] = field(default_factory=list)
    rss: dict[str, list[tuple[float, int]]] = field(default_factory=dict)  # process -> samples

    @property
    def by_kind(self) -> Counter[str]:
        return Counter(o.kind for o in self.outcomes)

    @property
    def failures(self) -> Counter[str]:
        fine = {"ok", *map(str, RETRYABLE)}
        return Counter({k: n for k, n in self.by_kind.items() if k not in fine})

    def latency(self, q: float) -> float:
        """The ``q`` quantile (0..1) of the seconds a completed request took."""
        done = sorted(o.seconds for o in self.outcomes if o.kind == "ok")
        if not done:
            return float("nan")
        return done[min(len(done) - 1, int(q * len(done)))]

    @property
    def tokens_per_second(self) -> float:
        return sum(o.tokens for o in self.outcomes) / self.seconds

    def peak_rss(self) -> dict[str, int]:
        return {name: max(rss for _, rss in samples) for name, samples in self.rss.items()}

    def growth(self, name: str, warmup: float) -> int:
        """How much ``name``'s memory grew over the soak: the median RSS of its last fifth
        minus that of its first fifth after ``warmup`` seconds."""
        samples = [rss for t, rss in self.rss.get(name, []) if t >= warmup]
        if len(samples) < 10:
            raise ValueError(f"too few memory samples of {name} ({len(samples)})")
        fifth = len(samples) // 5
        return int(statistics.median(samples[-fifth:]) - statistics.median(samples[:fifth]))

    def summary(self) -> dict[str, Any]:
        return {
            "clients": self.clients,
            "seconds": self.seconds,
            "requests": len(self.outcomes),
            "outcomes": dict(self.by_kind),
            "latency_p50_s": self.latency(0.5),
            "latency_p99_s": self.latency(0.99),
            "tokens_per_second": self.tokens_per_second,
            "peak_rss_bytes": self.peak_rss(),
        }


def ray_processes() -> dict[str, psutil.Process]:
    """This machine's Ray processes that matter to Corral, by a readable name: the
    ingress, the controller, Serve's controller, each replica, each raylet and GCS."""
    found: dict[str, psutil.Process] = {}
    for proc in psutil.process_iter(["cmdline", "pid"]):
        cmd = proc.info["cmdline"] or []
        title = cmd[0] if cmd else ""
        if title.startswith("ray::ServeReplica:corral:Ingress"):
            name = "ingress"
        elif title.startswith("ray::Controller"):
            name = "controller"
        elif title.startswith("ray::ServeController"):
            name = "serve controller"
        elif title.startswith("ray::ServeReplica:model-"):
            name = "replica " + title.split(":")[3]
        elif title.endswith("/raylet") or title.endswith("/gcs_server"):
            name = f"{title.rsplit('/', 1)[1]} {proc.info['pid']}"
        else:
            continue
        found[name if name not in found else f"{name} {proc.info['pid']}"] = proc
    return found


def _sample_memory(rss: dict[str, list[tuple[float, int]]], stop: threading.Event) -> None:
    started = time.monotonic()
    processes = ray_processes()
    while not stop.wait(0.5):
        now = time.monotonic() - started
        for name, proc in processes.items():
            try:
                rss.setdefault(name, []).append((now, proc.memory_info().rss))
            except psutil.Error:  # it died: the samples stop, the test sees it
                pass


async def _client(
    http: httpx.AsyncClient, body: dict, deadline: float, outcomes: list[Outcome]
) -> None:
    while time.monotonic() < deadline:
        started = time.monotonic()
        kind, tokens, wait = "ok", 0, 0.0
        try:
            async with http.stream("POST", "/v1/chat/completions", json=body) as r:
                if r.status_code != 200:
                    await r.aread()
                    retry = r.headers.get("retry-after")
                    if r.status_code in RETRYABLE and retry:
                        kind, wait = str(r.status_code), min(2.0, float(retry))
                    else:
                        kind = f"{r.status_code} without Retry-After"
                else:
                    kind, tokens = await _read_stream(r)
        except httpx.HTTPError as exc:
            kind = type(exc).__name__
        outcomes.append(Outcome(kind, time.monotonic() - started, tokens))
        if wait:
            await asyncio.sleep(wait)


async def _read_stream(r: httpx.Response) -> tuple[str, int]:
    tokens, done = 0, False
    async for line in r.aiter_lines():
        if not line.startswith("data: "):
            continue
        data = line[6:]
        if data == "[DONE]":
            done = True
        elif data.startswith('{"error"'):
            return "error event", tokens
        else:
            usage = json.loads(data).get("usage")
            if usage:
                tokens = usage["completion_tokens"]
    return ("ok" if done else "no [DONE]"), tokens


def soak(url: str, model: str, *, clients: int, seconds: float, max_tokens: int) -> SoakResult:
    """Run ``clients`` streaming clients against ``model`` at ``url`` for ``seconds``."""
    assert url.startswith("http://127.0.0.1:"), "load goes to this machine only"
    body = {
        "model": model,
        "messages": [{"role": "user", "content": "Tell me about the sea."}],
        "max_tokens": max_tokens,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    result = SoakResult(clients, seconds)
    stop = threading.Event()
    sampler = threading.Thread(target=_sample_memory, args=(result.rss, stop), daemon=True)
    sampler.start()

    async def run() -> None:
        limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
        timeout = httpx.Timeout(seconds + 60)
        async with httpx.AsyncClient(base_url=url, limits=limits, timeout=timeout) as http:
            deadline = time.monotonic() + seconds
            await asyncio.gather(
                *(_client(http, body, deadline, result.outcomes) for _ in range(clients))
            )

    started = time.monotonic()
    try:
        asyncio.run(run())
    finally:
        stop.set()
        sampler.join()
    result.seconds = time.monotonic() - started
    return result


def table(result: SoakResult) -> str:
    """The soak's figures as a text table."""
    lines = [
        f"{result.clients} streaming clients for {result.seconds:.0f} s: "
        f"{len(result.outcomes)} requests",
        "",
        f"{'ended as':<32}{'requests':>10}",
    ]
    lines += [f"{kind:<32}{n:>10}" for kind, n in sorted(result.by_kind.items())]
    lines += [
        "",
        f"latency of completed requests: p50 {result.latency(0.5):.2f} s, "
        f"p99 {result.latency(0.99):.2f} s",
        f"tokens generated: {result.tokens_per_second:.1f} tokens/s",
        "",
        f"{'process':<44}{'peak RSS':>12}",
    ]
    lines += [f"{name:<44}{rss / MIB:>8.0f} MiB" for name, rss in sorted(result.peak_rss().items())]
    return "\n".join(lines)
