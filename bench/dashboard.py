"""What do open dashboard tabs cost the API?

A simulated homelab of two Ray nodes (``bench/_cluster.py``) runs Corral with the
starter model (llama.cpp). Rounds alternate two settings on the same warm cluster:

  0 tabs   nothing but the chats
  N tabs   --tabs (3) clients reading /api/cluster/stream the whole time, as the
           dashboard's tabs do (one Server-Sent Events request each; the page's
           other calls are made when a person clicks)

and each round streams --chats (8) greedy chat completions of --tokens (64) tokens
one after another. Measured per setting: TTFT p50 and per-stream decode tokens/s of
the chats, the CPU seconds per minute of the ingress and the controller processes,
and, with tabs open, the snapshots and bytes per second each tab receives and the
calls per second the feed makes to the controller (three per poll, one poll per 2 s
for all tabs together). Paired ratios (N tabs over 0 tabs, same round) are the
figures to read: the box is shared and noisy. Results go to
bench/results/dashboard-<time>.json (or --json PATH).

Run: .venv/bin/python bench/dashboard.py            (about two minutes)
     .venv/bin/python bench/dashboard.py --rounds 1 --chats 4
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import httpx
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _cluster import SimNode, corral_on, homelab, write_results  # noqa: E402

from deployments.dashboard.feed import INTERVAL  # noqa: E402
from nodes.models import STARTER_MODEL  # noqa: E402

NODES = [SimNode("minipc-n100-ram16g", "head", "box1"), SimNode("nas-ram8g", "worker", "box2")]
PROMPT = "Tell me a short story about a lighthouse keeper and a storm."
# Process titles Ray gives the actors whose CPU the dashboard could add to.
PROCESSES = {"ingress": "ray::ServeReplica:corral:Ingress", "controller": "ray::Controller"}


@dataclass
class Phase:
    tabs: int
    round: int
    ttft: list[float] = field(default_factory=list)
    decode: list[float] = field(default_factory=list)  # tokens/s after the first token
    cpu: dict[str, float] = field(default_factory=dict)  # process -> CPU s per minute
    snapshots_per_s: float = 0.0  # per tab
    bytes_per_s: float = 0.0  # per tab
    failed: int = 0


def processes() -> dict[str, list[psutil.Process]]:
    found: dict[str, list[psutil.Process]] = {name: [] for name in PROCESSES}
    for p in psutil.process_iter(["cmdline"]):
        title = (p.info["cmdline"] or [""])[0]
        for name, prefix in PROCESSES.items():
            if title.startswith(prefix):
                found[name].append(p)
    return found


def cpu_seconds(procs: dict[str, list[psutil.Process]]) -> dict[str, float]:
    out = {}
    for name, ps in procs.items():
        total = 0.0
        for p in ps:
            try:
                times = p.cpu_times()
                total += times.user + times.system
            except psutil.NoSuchProcess:
                pass
        out[name] = total
    return out


class Tab(threading.Thread):
    """One dashboard tab's stream, read until ``stop``."""

    def __init__(self, url: str) -> None:
        super().__init__(daemon=True)
        self.url, self.stop = url, threading.Event()
        self.snapshots = self.bytes = 0

    def run(self) -> None:
        with httpx.stream("GET", f"{self.url}/api/cluster/stream", timeout=30) as r:
            for line in r.iter_lines():
                self.bytes += len(line) + 1
                self.snapshots += line.startswith("event: snapshot")
                if self.stop.is_set():
                    return


def chat(url: str, tokens: int) -> tuple[float, float]:
    """One streamed greedy chat: (TTFT s, decode tokens/s)."""
    body = {
        "model": STARTER_MODEL,
        "messages": [{"role": "user", "content": PROMPT}],
        "max_tokens": tokens,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    started = time.perf_counter()
    first = last = None
    generated = 0
    with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=120) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if not line.startswith("data: {"):
                continue
            now = time.perf_counter()
            if '"content":"' in line and first is None:
                first = now
            if '"usage":{' in line and '"completion_tokens"' in line:
                generated = json.loads(line[6:])["usage"]["completion_tokens"]
            last = now
    if first is None or last is None or generated < 2:
        raise RuntimeError("the stream ended without tokens")
    return first - started, (generated - 1) / max(last - first, 1e-6)


def run_phase(url: str, tabs: int, round_: int, chats: int, tokens: int) -> Phase:
    phase = Phase(tabs, round_)
    readers = [Tab(url) for _ in range(tabs)]
    for t in readers:
        t.start()
    time.sleep(INTERVAL * 1.5 if tabs else 0)  # the feed is polling before the chats start
    procs = processes()
    cpu_before, started = cpu_seconds(procs), time.monotonic()
    counted = [(t.snapshots, t.bytes) for t in readers]
    for _ in range(chats):
        try:
            ttft, decode = chat(url, tokens)
        except Exception:  # noqa: BLE001 - counted, and the table says so
            phase.failed += 1
            continue
        phase.ttft.append(ttft)
        phase.decode.append(decode)
    seconds = time.monotonic() - started
    cpu_after = cpu_seconds(procs)
    phase.cpu = {k: round((cpu_after[k] - cpu_before[k]) / seconds * 60, 2) for k in cpu_after}
    if readers:
        pairs = list(zip(readers, counted, strict=True))
        phase.snapshots_per_s = round(
            statistics.mean((t.snapshots - s) for t, (s, _) in pairs) / seconds, 3
        )
        phase.bytes_per_s = round(
            statistics.mean((t.bytes - b) for t, (_, b) in pairs) / seconds, 1
        )
    for t in readers:
        t.stop.set()
    return phase


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--chats", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--tabs", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()

    phases: list[Phase] = []
    with homelab(NODES) as lab, corral_on(lab, num_threads=args.threads, num_ctx=2048) as corral:
        url = corral.url
        chat(url, 8)  # load the model, warm it
        for r in range(args.rounds):
            for tabs in (0, args.tabs):
                phase = run_phase(url, tabs, r, args.chats, args.tokens)
                phases.append(phase)
                print(
                    f"round {r + 1} {tabs} tabs: TTFT p50 {ms(phase.ttft)}, decode p50 "
                    f"{med(phase.decode):.1f} tok/s, CPU/min {phase.cpu}",
                    flush=True,
                )
    report(phases, args)


def med(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def ms(values: list[float]) -> str:
    return f"{med(values) * 1000:.0f} ms"


def report(phases: list[Phase], args: argparse.Namespace) -> None:
    base = [p for p in phases if p.tabs == 0]
    open_ = [p for p in phases if p.tabs == args.tabs]
    ttft_ratio = med([med(o.ttft) / med(b.ttft) for b, o in zip(base, open_, strict=True)])
    decode_ratio = med([med(o.decode) / med(b.decode) for b, o in zip(base, open_, strict=True)])
    rows = []
    for label, group in (("0 tabs", base), (f"{args.tabs} tabs", open_)):
        cpu = {k: med([p.cpu[k] for p in group]) for k in PROCESSES}
        rows.append(
            {
                "setting": label,
                "ttft_p50_ms": round(med([t for p in group for t in p.ttft]) * 1000, 1),
                "decode_p50": round(med([d for p in group for d in p.decode]), 1),
                "ingress_cpu_s_per_min": cpu["ingress"],
                "controller_cpu_s_per_min": cpu["controller"],
                "snapshots_per_s_per_tab": med([p.snapshots_per_s for p in group]),
                "bytes_per_s_per_tab": med([p.bytes_per_s for p in group]),
                "failed": sum(p.failed for p in group),
            }
        )
    print()
    print("| setting | TTFT p50 | decode tok/s | ingress CPU s/min | controller CPU s/min "
          "| snapshots/s per tab | bytes/s per tab | failed |")  # fmt: skip
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(
            f"| {r['setting']} | {r['ttft_p50_ms']:.0f} ms | {r['decode_p50']:.1f} | "
            f"{r['ingress_cpu_s_per_min']:.2f} | {r['controller_cpu_s_per_min']:.2f} | "
            f"{r['snapshots_per_s_per_tab']:.2f} | {r['bytes_per_s_per_tab']:.0f} | {r['failed']} |"
        )
    calls = 3 / INTERVAL
    print(
        f"\n{args.tabs} tabs over 0 (paired, median of rounds): TTFT {ttft_ratio:.2f}x, "
        f"decode {decode_ratio:.2f}x; the feed asks the controller {calls:.1f} times/s "
        f"whatever the number of tabs."
    )
    write_results(
        Path(__file__).parent / "results",
        "dashboard",
        args.json,
        {
            "args": vars(args) | {"json": str(args.json) if args.json else None},
            "rows": rows,
            "ttft_ratio": ttft_ratio,
            "decode_ratio": decode_ratio,
            "controller_calls_per_s": calls,
            "phases": [asdict(p) for p in phases],
        },
    )


if __name__ == "__main__":
    main()
