"""What API keys, request ids and metrics cost each request.

Serves the real app (``build_api``) with uvicorn on 127.0.0.1 over
``LocalBackend`` with the fake engine (no token delay), so that the HTTP
path is all there is to measure, in three set-ups taking turns:

- ``bare``: the app with no key file; ids and metrics always run;
- ``keys``: 100 keys in the file (each request is hashed and compared with all
  of them in constant time), the good key sent;
- ``keys+scrape``: as ``keys``, with a ``/metrics`` scrape after every 50
  requests, as a Prometheus scraping often would see.

Each set-up sends the same sequence from one client: ``GET /api/version``
(the cheapest route) and a non-streamed ``POST /v1/chat/completions`` of 8
tokens. Prints the median and p99 per request, with the ratio to ``bare``,
and writes JSON.

    .venv/bin/python bench/api_overhead.py [--requests 1000] [--runs 3] [--json FILE]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._cluster import write_results  # noqa: E402
from deployments.api import build_api  # noqa: E402
from deployments.auth import Keyring  # noqa: E402
from deployments.keys import KeyFile, keys_path  # noqa: E402
from nodes.engine import EngineSpec  # noqa: E402
from tests.support.local_backend import LocalBackend  # noqa: E402
from tests.support.serve import serve_app  # noqa: E402

OUT = Path(__file__).parent / "results"
MODEL = "fake:bench"
CHAT = {
    "model": MODEL,
    "messages": [{"role": "user", "content": "hi"}],
    "max_tokens": 8,
}
SETUPS = ("bare", "keys", "keys+scrape")


def measure(url: str, key: str | None, requests: int, scrape_every: int | None) -> dict:
    """Seconds per request of each kind, over ``requests`` of each."""
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    times: dict[str, list[float]] = {"version": [], "chat": []}
    with httpx.Client(base_url=url, headers=headers, timeout=30) as client:
        for _ in range(20):  # warm up: connections, the engine, first-use imports
            client.get("/api/version")
            client.post("/v1/chat/completions", json=CHAT)
        for i in range(requests):
            started = time.perf_counter()
            r = client.get("/api/version")
            times["version"].append(time.perf_counter() - started)
            started = time.perf_counter()
            c = client.post("/v1/chat/completions", json=CHAT)
            times["chat"].append(time.perf_counter() - started)
            assert r.status_code == c.status_code == 200, (r.text, c.text)
            if scrape_every and i % scrape_every == 0:
                assert client.get("/metrics").status_code == 200
    return times


def summary(samples: list[float]) -> dict:
    ordered = sorted(samples)
    return {
        "median_ms": 1000 * statistics.median(ordered),
        "p99_ms": 1000 * ordered[int(0.99 * (len(ordered) - 1))],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=1000)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()

    backend = LocalBackend(
        [EngineSpec(model=MODEL, path="", engine="fake", options={"token_delay": 0})]
    )
    state = Path(tempfile.mkdtemp(prefix="corral-bench-"))
    file = KeyFile(keys_path(state))
    key = ""
    for i in range(100):
        _, key = file.create(f"k{i}")
    apps = {
        "bare": (build_api(backend), None, None),
        "keys": (build_api(backend, keyring=Keyring(keys_path(state))), key, None),
        "keys+scrape": (build_api(backend, keyring=Keyring(keys_path(state))), key, 50),
    }
    samples: dict[str, dict[str, list[float]]] = {s: {"version": [], "chat": []} for s in SETUPS}
    for run in range(args.runs):
        for setup in SETUPS:  # taking turns, so drift in the machine hits all alike
            app, key_sent, scrape = apps[setup]
            with serve_app(app) as url:
                times = measure(url, key_sent, args.requests, scrape)
            for kind, values in times.items():
                samples[setup][kind] += values
            print(f"run {run + 1}/{args.runs}: {setup} done", file=sys.stderr)

    results: dict = {"requests_per_run": args.requests, "runs": args.runs, "setups": {}}
    print(f"\n{'set-up':<12} {'request':<8} {'median ms':>10} {'p99 ms':>8} {'x bare':>7}")
    for setup in SETUPS:
        results["setups"][setup] = {}
        for kind in ("version", "chat"):
            row = summary(samples[setup][kind])
            base = summary(samples["bare"][kind])["median_ms"]
            row["ratio_to_bare"] = row["median_ms"] / base
            results["setups"][setup][kind] = row
            print(
                f"{setup:<12} {kind:<8} {row['median_ms']:>10.2f} {row['p99_ms']:>8.2f} "
                f"{row['ratio_to_bare']:>7.2f}"
            )
    write_results(OUT, "api_overhead", args.json, results)


if __name__ == "__main__":
    main()
