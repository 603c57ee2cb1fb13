"""How fast is a model split over boxes, next to the same model whole?

Corral's engine (the real one, the starter model: 30 blocks and the output layer)
loads the model whole, then split over 2 and 3 parts through llama.cpp RPC workers
(``python -m nodes.rpc serve``, as a lending box runs them): once over loopback,
once over a link limited like a homelab's wired LAN. For the link, each worker runs
in a network namespace of its own (``corral-split-N``, made here and removed after),
joined to this one by a veth pair whose two ends both shape their traffic with
``tc netem`` (``--rate``, default 1gbit, and half of ``--rtt``, default 0.2 ms, each
way; a kernel without netem gets ``tbf``, the rate alone, and the table says so).
Traffic stays inside this machine. The link needs root (``ip netns``).

Each variant runs in a child process (a process registers its RPC devices for good)
and measures, ``--reps`` times (the median):

  prefill  tokens/s of a ``--prompt``-token prompt (the time to its first token)
  decode   tokens/s of the next ``--tokens`` greedy tokens

The layers go as the planner would send them to nodes with equal free memory: the
main part keeps the first blocks and the output layer, each worker a run of the
other blocks. Targets (issue 18): a 2-way split over the 1 Gbit link decodes at
>= 0.8x the whole model and prefills at >= 0.6x.

Each part stands for a box of its own, but here they share this machine's cores:
with several threads each, a part's idle OpenMP threads spin while another part
computes and take the cores it needs (on a 2-core box that halved the split's
decode speed, an effect separate boxes do not have). So each part, and the whole
model it is compared with, gets ``--threads`` 1 by default: the parts of a split
run one after another, so one thread each keeps them from competing, and the
ratio measures what the split itself costs (the round trips and the link).

Results go to bench/results/split-<time>.json (or --json PATH).

Run: sudo .venv/bin/python bench/split.py [--threads 1 --tokens 128 --prompt 256 --reps 3]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from _cluster import write_results  # noqa: E402

from nodes import rpc  # noqa: E402
from nodes.models import starter_model_path  # noqa: E402

BLOCKS = 30  # the starter model's blocks (its output layer stays with the main part)
PROMPT = "The lighthouse keeper climbed the spiral stairs every evening at dusk. "
NET = "10.231"  # namespace N: its worker at NET.N.2, this side at NET.N.1
PORT = 50052

# Runs in a child: load the model (split over the endpoints given), then time a prompt and
# greedy decode with Corral's engine, reps times.
MEASURE = r"""
import json, sys, threading
from nodes.engine import (ChatMessage, EngineSpec, Finished, GenerateRequest, RpcPart,
                          SamplingParams, load_engine)
args = json.loads(sys.argv[1])
parts = tuple(RpcPart(f"worker{i}", e, n) for i, (e, n) in enumerate(args["parts"]))
spec = EngineSpec(model="bench", path=args["path"], n_ctx=args["prompt"] + args["tokens"] + 256,
                  n_threads=args["threads"], rpc=parts)
engine = load_engine(spec)
results = []
for rep in range(args["reps"] + 1):  # the first warms the workers' caches and is dropped
    # a prompt no cache holds: the rep number first
    text = f"{rep}. " + args["text"]
    request = GenerateRequest(messages=(ChatMessage("user", text),),
                              params=SamplingParams(max_tokens=args["tokens"], temperature=0.0))
    prompt = engine.encode(request)
    done = [e for e in engine.generate(prompt, request.params, threading.Event())
            if isinstance(e, Finished)][0]
    if rep:
        results.append({
            "prompt_tokens": done.usage.prompt_tokens,
            "completion_tokens": done.usage.completion_tokens,
            "prefill_s": done.timings.prompt,
            "decode_s": done.timings.generation,
        })
engine.close()
print(json.dumps(results))
"""


@dataclass
class Row:
    variant: str
    link: str
    parts: int
    layers: str  # e.g. "15 + 16"
    prefill_tps: float
    decode_tps: float
    prefill_ratio: float | None = None
    decode_ratio: float | None = None


def shares(ways: int) -> list[int]:
    """Blocks per part, the main part first, as equal as whole blocks allow."""
    base, extra = divmod(BLOCKS, ways)
    return [base + (1 if i >= ways - extra else 0) for i in range(ways)]


def sh(*command: str) -> None:
    subprocess.run(command, check=True, capture_output=True, text=True)


SHAPED = {"latency": True}  # False once netem turned out missing: the rate only (tbf)


def shape(prefix: list[str], dev: str, rate: str, delay: str) -> None:
    """``tc netem`` with the rate and delay; where the kernel has no netem, ``tbf`` with the
    rate alone (and the table says the latency was not shaped)."""
    netem = [*prefix, "tc", "qdisc", "add", "dev", dev, "root", "netem", "delay", delay]
    if SHAPED["latency"]:
        out = subprocess.run([*netem, "rate", rate], capture_output=True, text=True)
        if out.returncode == 0:
            return
        if "unknown" not in out.stderr:
            raise SystemExit(f"tc netem failed: {out.stderr.strip()}")
        SHAPED["latency"] = False
        print("this kernel has no netem: the link is shaped to the rate only (tbf)")
    sh(*prefix, "tc", "qdisc", "add", "dev", dev, "root", "tbf", "rate", rate,
       "burst", "256kb", "latency", "50ms")  # fmt: skip


@contextmanager
def shaped_namespace(n: int, rate: str, rtt_ms: float) -> Iterator[str]:
    """Namespace ``corral-split-N`` behind a veth pair shaped both ways; yields its address."""
    ns, host, inner = f"corral-split-{n}", f"cs{n}h", f"cs{n}n"
    delay = f"{rtt_ms / 2:.3f}ms"
    subprocess.run(["ip", "netns", "del", ns], capture_output=True)  # a leftover of a crash
    sh("ip", "netns", "add", ns)
    try:
        sh("ip", "link", "add", host, "type", "veth", "peer", "name", inner)
        sh("ip", "link", "set", inner, "netns", ns)
        sh("ip", "addr", "add", f"{NET}.{n}.1/24", "dev", host)
        sh("ip", "link", "set", host, "up")
        sh("ip", "netns", "exec", ns, "ip", "addr", "add", f"{NET}.{n}.2/24", "dev", inner)
        sh("ip", "netns", "exec", ns, "ip", "link", "set", inner, "up")
        sh("ip", "netns", "exec", ns, "ip", "link", "set", "lo", "up")
        for prefix, dev in (((), host), (("ip", "netns", "exec", ns), inner)):
            shape(list(prefix), dev, rate, delay)
        yield ns
    finally:
        subprocess.run(["ip", "link", "del", host], capture_output=True)
        subprocess.run(["ip", "netns", "del", ns], capture_output=True)


@contextmanager
def workers(ways: int, link: str, args, cache: Path) -> Iterator[list[str]]:
    """``ways - 1`` RPC workers, on loopback or each behind its shaped link; their endpoints."""
    with ExitStack() as stack:
        endpoints = []
        for i in range(1, ways):
            if link == "loopback":
                endpoint, prefix = f"127.0.0.1:{PORT + i}", []
            else:
                ns = stack.enter_context(shaped_namespace(i, args.rate, args.rtt))
                endpoint, prefix = f"{NET}.{i}.2:{PORT}", ["ip", "netns", "exec", ns]
            command = [*prefix, sys.executable, "-m", "nodes.rpc", "serve", endpoint]
            command += ["--threads", str(args.threads), "--cache-dir", str(cache / str(i))]
            process = subprocess.Popen(
                command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
            )
            stack.callback(lambda p=process: (p.kill(), p.wait()))
            deadline = time.monotonic() + rpc.START_TIMEOUT
            while True:
                try:
                    rpc.hello(endpoint, timeout=1.0)
                    break
                except OSError:
                    if process.poll() is not None or time.monotonic() > deadline:
                        raise SystemExit(f"the RPC worker at {endpoint} did not start") from None
                    time.sleep(0.1)
            endpoints.append(endpoint)
        yield endpoints


def measure(args, endpoints: list[str], layers: list[int]) -> tuple[float, float]:
    """(prefill tokens/s, decode tokens/s), medians of the reps."""
    spec = {
        "path": str(starter_model_path()),
        "parts": list(zip(endpoints, layers[1:], strict=True)),
        "threads": args.threads,
        "prompt": args.prompt,
        "tokens": args.tokens,
        "reps": args.reps,
        "text": PROMPT * max(1, args.prompt // 14),
    }
    out = subprocess.run(
        [sys.executable, "-c", MEASURE, json.dumps(spec)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    if out.returncode != 0:
        raise SystemExit(f"the measurement failed:\n{out.stderr[-2000:]}")
    runs = json.loads(out.stdout.strip().splitlines()[-1])
    prefill = statistics.median(r["prompt_tokens"] / r["prefill_s"] for r in runs)
    decode = statistics.median((r["completion_tokens"] - 1) / r["decode_s"] for r in runs)
    return prefill, decode


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=1, help="per part (see above)")
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--prompt", type=int, default=256, help="about this many prompt tokens")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--rate", default="1gbit", help="the shaped link's rate (tc netem)")
    parser.add_argument("--rtt", type=float, default=0.2, help="its round trip, in ms")
    parser.add_argument("--ways", type=int, nargs="+", default=[2, 3])
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    if not rpc.available():
        raise SystemExit("llama-cpp-python was built without -DGGML_RPC=on")
    links = ["loopback"] + ([f"{args.rate}, {args.rtt} ms RTT"] if os.geteuid() == 0 else [])
    if len(links) == 1:
        print("not root: the shaped link (ip netns) is left out")

    rows: list[Row] = []
    with tempfile.TemporaryDirectory(prefix="corral-split-") as tmp:
        prefill, decode = measure(args, [], [BLOCKS])
        rows.append(Row("whole", "-", 1, f"{BLOCKS} + output", prefill, decode))
        for link in links:
            for ways in args.ways:
                layers = shares(ways)
                with workers(ways, link, args, Path(tmp)) as endpoints:
                    prefill, decode = measure(args, endpoints, layers)
                if link != "loopback" and not SHAPED["latency"]:
                    link = f"{args.rate} (latency not shaped: no netem)"
                name = f"split {ways}-way"
                held = " + ".join([f"{layers[0]} + output", *map(str, layers[1:])])
                rows.append(Row(name, link, ways, held, prefill, decode))
    whole = rows[0]
    for row in rows[1:]:
        row.prefill_ratio = row.prefill_tps / whole.prefill_tps
        row.decode_ratio = row.decode_tps / whole.decode_tps

    print(f"\nthe starter model, {args.threads} threads per part, a {args.prompt}-token prompt "
          f"and {args.tokens} greedy tokens, median of {args.reps}:\n")  # fmt: skip
    print("| variant | link | layers | prefill tok/s | decode tok/s | vs whole |")
    print("| --- | --- | --- | --- | --- | --- |")
    for r in rows:
        versus = ""
        if r.decode_ratio is not None:
            versus = f"prefill {r.prefill_ratio:.2f}x, decode {r.decode_ratio:.2f}x"
        print(f"| {r.variant} | {r.link} | {r.layers} | {r.prefill_tps:.0f} | "
              f"{r.decode_tps:.1f} | {versus} |")  # fmt: skip
    results = {
        "settings": vars(args) | {"json": None},
        "latency_shaped": SHAPED["latency"],
        "rows": [asdict(r) for r in rows],
    }
    write_results(ROOT / "bench" / "results", "split", args.json, results)


if __name__ == "__main__":
    main()
