"""Pull speed: one connection per blob vs several ranges in parallel.

Pulls the starter model (98 MB, in Ollama's manifest format) from Debian's
``docker-registry`` on 127.0.0.1 into a fresh store, with ``parts=1`` and
``parts=4``, taking turns, over two links:

- ``loopback``: straight to the registry, no limit but the CPU;
- ``capped``: through the test proxy, which holds each connection to about
  12.8 MB/s (64 KiB every 5 ms), as a CDN or a busy registry limits each
  connection; this is where parallel ranges are meant to help.

Every pull is verified (sha256) as in real use. Prints a table and writes JSON.

    .venv/bin/python bench/pull.py [--runs 3] [--json FILE]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._cluster import write_results  # noqa: E402
from nodes.models import starter_model_path  # noqa: E402
from nodes.pull import Puller  # noqa: E402
from nodes.store import Store  # noqa: E402
from tests.support.oci import (  # noqa: E402
    RegistryProxy,
    ollama_model,
    push_model,
    running_registry,
)

OUT = Path(__file__).parent / "results"
REPOSITORY = "library/bench"
PART = 16 * 1024**2


async def pull_once(host: str, parts: int, root: Path) -> float:
    puller = Puller(Store(root), parts=parts, part_size=PART)
    started = time.perf_counter()
    async for _ in puller.pull(f"{host}/{REPOSITORY}:v1", insecure=True):
        pass
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    size = starter_model_path().stat().st_size
    times: dict[tuple[str, int], list[float]] = {}
    with tempfile.TemporaryDirectory() as work, running_registry(Path(work)) as registry:
        push_model(registry.url, REPOSITORY, "v1", ollama_model(starter_model_path()))
        proxy = RegistryProxy(registry.host, chunk_delay=0.005).start()
        try:
            links = {"loopback": registry.host, "capped": proxy.host}
            for run in range(args.runs):
                for link, host in links.items():
                    for parts in (1, 4):
                        with tempfile.TemporaryDirectory() as root:
                            took = asyncio.run(pull_once(host, parts, Path(root)))
                        times.setdefault((link, parts), []).append(took)
                        print(f"run {run + 1}: {link:8} parts={parts}: {took:.2f} s", flush=True)
        finally:
            proxy.close()

    rows = []
    print(f"\nstarter model {size / 1e6:.0f} MB, median of {args.runs} pulls each")
    print(f"{'link':10} {'parts':>5} {'seconds':>8} {'MB/s':>7} {'x parts=1':>10}")
    for (link, parts), samples in times.items():
        median = statistics.median(samples)
        base = statistics.median(times[(link, 1)])
        rows.append(
            {
                "link": link,
                "parts": parts,
                "median_s": median,
                "samples_s": samples,
                "mb_per_s": size / 1e6 / median,
                "speedup": base / median,
            }
        )
        print(
            f"{link:10} {parts:>5} {median:>8.2f} {size / 1e6 / median:>7.1f} "
            f"{base / median:>10.2f}"
        )
    write_results(OUT, "pull", args.json, {"size": size, "runs": args.runs, "results": rows})


if __name__ == "__main__":
    main()
