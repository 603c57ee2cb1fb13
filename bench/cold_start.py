"""How long does a request wait for a model that was scaled to zero?

The starter model (llama.cpp, context --ctx, --threads threads) is declared on a
one-node simulated cluster with ``replicas: {min: 0, max: 1}``, so nothing runs
until a request asks for it, and is measured three ways in each run:

  bare      ``LlamaCppEngine(EngineSpec(...))`` in a fresh Python process: the
            constructor alone ("ctor"), and the process's wall time from spawn to
            loaded ("process": interpreter start + imports + load)
  cold      a streamed chat completion to Corral while the model has no replica:
            time to the first content chunk (TTFT). The request makes the
            controller plan a placement, deploy it to Serve, wait until it runs,
            and then route the request to it
  warm      the same kind of request with the model loaded (--warm requests, the
            median); the last one carries ``keep_alive: 0``, so the model unloads
            after it, and the next run starts cold again once
            /api/cluster/placements lists no placement of it and Serve has
            deleted the application

The cold start is broken down from the request's send time: when the replica
finished loading its engine (the replica's ``loaded_at``), when the controller
saw it running (its "load" event, whose reason says "ready in X s" counted
from when the controller began), and the first token. One untimed cold start
comes first (--no-prime to skip), so that every timed one finds the files in
the page cache, as the bare loads do.

Target: cold TTFT (median) <= bare load (ctor, median) + 1.5 s; the same
against the bare process time is printed too. Results go to
bench/results/cold_start-<time>.json (or --json PATH).

Run: .venv/bin/python bench/cold_start.py --runs 3
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path

import httpx
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _cluster import (  # noqa: E402
    ROOT,
    SimNode,
    corral_on,
    homelab,
    run_main,
    wait_until,
    write_results,
)

NODES = [SimNode("minipc-n100-ram16g", "head", "minipc")]
TARGET_MARGIN = 1.5  # seconds a cold start may add to the bare load

# Runs in a fresh interpreter: times the imports and the constructor.
BARE_LOAD = r"""
import json, sys, time
t0 = time.perf_counter()
from nodes.engine import EngineSpec
from nodes.llamacpp import LlamaCppEngine
t1 = time.perf_counter()
path, ctx, threads = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
engine = LlamaCppEngine(EngineSpec("bare", path, n_ctx=ctx, n_threads=threads))
t2 = time.perf_counter()
print(json.dumps({"started": t0, "import_s": t1 - t0, "ctor_s": t2 - t1,
                  "engine_load_s": engine.info.load_seconds}), flush=True)
engine.close()
"""


@dataclass
class Stream:
    ttft: float = 0.0  # seconds from sending to the first content chunk
    total: float = 0.0
    text: str = ""
    error: str | None = None


@dataclass
class Bare:
    ctor_s: float  # the constructor
    import_s: float  # importing nodes.llamacpp (llama_cpp, jinja2, ...)
    interpreter_s: float  # spawn to the first line of the script
    process_s: float  # spawn to loaded: interpreter + imports + constructor


# The stages of a cold start, in order, as offsets from sending the request. Where a
# number comes from: Serve's controller log (deploy, scheduled, serve running), the
# replica's process (started), the replica's Serve log (init start), the replica itself
# (engine loaded), Corral's controller "load" event (controller ready), the stream.
STAGES = {
    "deploy": "Corral deploys the placement to Serve",
    "scheduled": "Serve starts a replica actor",
    "process": "the replica's worker process starts",
    "init_start": "the replica's __init__ begins",
    "engine_loaded": "its engine is loaded",
    "serve_running": "Serve marks the replica running",
    "controller_ready": "Corral's controller sees it running",
    "first_token": "the first token arrives",
}


@dataclass
class Run:
    index: int
    bare: Bare
    cold: Stream
    warm: list[Stream] = field(default_factory=list)
    stages: dict[str, float | None] = field(default_factory=dict)  # STAGES -> s after send
    controller_reason: str = ""  # the "load" event's reason ("requested; ready in X s")
    unload_s: float = 0.0  # last warm reply -> no placement and no Serve app

    @property
    def warm_ttft(self) -> float:
        ok = [s.ttft for s in self.warm if s.error is None]
        return statistics.median(ok) if ok else 0.0


# -- measuring ---------------------------------------------------------------------


def bare_load(args: argparse.Namespace) -> Bare:
    """Load the engine in a fresh process, as a replica would without Ray and Serve."""
    from nodes.models import starter_model_path

    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-c", BARE_LOAD, str(starter_model_path()), str(args.ctx)]
    spawned = time.perf_counter()  # CLOCK_MONOTONIC: comparable with the child's
    proc = subprocess.Popen(
        [*cmd, str(args.threads)], stdout=subprocess.PIPE, cwd=ROOT, env=env, text=True
    )
    try:
        line = proc.stdout.readline()
        loaded = time.perf_counter()
        proc.wait(60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    if proc.returncode != 0 or not line:
        raise RuntimeError(f"the bare load failed (exit {proc.returncode})")
    child = json.loads(line)
    return Bare(
        ctor_s=child["ctor_s"],
        import_s=child["import_s"],
        interpreter_s=child["started"] - spawned,
        process_s=loaded - spawned,
    )


def stream_chat(http: httpx.Client, model: str, prompt: str, args, keep_alive=None) -> Stream:
    body = {
        "model": model,
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": args.max_tokens,
        "temperature": 0,
        "stream": True,
    }
    if keep_alive is not None:
        body["keep_alive"] = keep_alive
    s = Stream()
    started = time.perf_counter()
    try:
        with http.stream("POST", "/v1/chat/completions", json=body, timeout=600) as r:
            if r.status_code != 200:
                r.read()
                s.error = f"HTTP {r.status_code}: {r.text[:200]}"
                return s
            for line in r.iter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                data = json.loads(line[6:])
                if "error" in data:
                    s.error = str(data["error"])[:200]
                    return s
                for choice in data.get("choices", []):
                    text = (choice.get("delta") or {}).get("content") or ""
                    if text and not s.text:
                        s.ttft = time.perf_counter() - started
                    s.text += text
    except httpx.HTTPError as exc:
        s.error = f"{type(exc).__name__}: {exc}"
        return s
    s.total = time.perf_counter() - started
    if not s.text:
        s.error = "no text"
    return s


def model_spec(args: argparse.Namespace):
    from cluster.spec import ModelSpec
    from nodes.models import STARTER_MODEL

    return ModelSpec(
        name=STARTER_MODEL,
        context=args.ctx,
        threads=args.threads,
        replicas={"min": 0, "max": 1},
    )


def placements_of(http: httpx.Client, model: str) -> list[dict]:
    r = http.get("/api/cluster/placements", timeout=30)
    r.raise_for_status()
    return [p for p in r.json()["placements"] if p["model"] == model]


def wait_unloaded(http: httpx.Client, model: str, timeout: float = 120) -> float:
    """Seconds until no placement of ``model`` is listed and Serve runs no app of it."""
    from ray import serve

    from cluster.serve_apps import app_name_for

    apps = {app_name_for(model, n.name) for n in NODES}

    def gone() -> bool:
        if placements_of(http, model):
            return False
        return not apps & set(serve.status().applications)

    return wait_until(gone, timeout=timeout, interval=0.1, what=f"{model} unloaded")


def replica_info(model: str, node: str):
    """What the replica of ``model`` on ``node`` says about itself (pid, loaded_at)."""
    from ray import serve

    from cluster.serve_apps import app_name_for
    from deployments.replica import REPLICA_DEPLOYMENT

    try:
        handle = serve.get_deployment_handle(REPLICA_DEPLOYMENT, app_name_for(model, node))
        return handle.info.remote().result(timeout_s=30)
    except Exception:  # noqa: BLE001 - a missing number, not a failed benchmark
        return None


SERVE_LOG_TIME = re.compile(r"^\w+ (\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) ")


def serve_log_times(logs: Path, app: str, since: float) -> dict[str, float]:
    """When Serve deployed ``app``, started its replica, began its __init__ and saw it
    running, the first time each happened after ``since`` (seconds since the epoch),
    from Serve's own logs. Best effort: a stage whose line is not found is left out."""
    wanted = {
        "deploy": f"Deploying new version of Deployment(name='ModelReplica', app='{app}')",
        "scheduled": f"deployment='ModelReplica', app='{app}')",  # "Starting Replica(...)"
        "serve_running": "started successfully",
        "init_start": "Started initializing replica.",
    }
    found: dict[str, float] = {}
    files = sorted((logs / "serve").glob("controller_*.log"))
    files += sorted((logs / "serve").glob(f"replica_{app}_*.log"))
    for path in files:
        try:
            lines = path.read_text(errors="replace").splitlines()
        except OSError:
            continue
        for line in lines:
            m = SERVE_LOG_TIME.match(line)
            if not m:
                continue
            when = datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp()
            if when < since:
                continue
            for stage, text in wanted.items():
                if stage in found or text not in line:
                    continue
                if stage == "scheduled" and "Starting Replica" not in line:
                    continue
                if stage == "serve_running" and f"app='{app}'" not in line:
                    continue
                found[stage] = when
    return found


def load_event(controller, model: str, since: float):
    import ray

    events = ray.get(controller.events.remote(since), timeout=30)
    return next((e for e in events if e.kind == "load" and e.model == model), None)


def one_run(index: int, http: httpx.Client, controller, lab, args: argparse.Namespace) -> Run:
    from cluster.serve_apps import app_name_for
    from nodes.models import STARTER_MODEL as model

    node = NODES[0].name
    bare = bare_load(args)
    time.sleep(args.settle)
    sent = time.time()
    cold = stream_chat(http, model, f"Run {index}: name three colours.", args)
    run = Run(index, bare, cold)
    if cold.error:
        raise RuntimeError(f"the cold request failed: {cold.error}")
    times: dict[str, float | None] = {"first_token": sent + cold.ttft}
    if info := replica_info(model, node):
        times["engine_loaded"] = info.loaded_at
        with contextlib.suppress(psutil.Error):
            times["process"] = psutil.Process(info.pid).create_time()
    if event := load_event(controller, model, sent):
        times["controller_ready"] = event.time
        run.controller_reason = event.reason
    logs = Path(lab.cluster.head_node.get_logs_dir_path())
    times.update(serve_log_times(logs, app_name_for(model, node), sent - 0.01))
    run.stages = {k: (times[k] - sent if times.get(k) else None) for k in STAGES}
    for i in range(args.warm):
        last = i == args.warm - 1
        prompt = f"Run {index}, question {i}: name a fruit."
        run.warm.append(stream_chat(http, model, prompt, args, keep_alive=0 if last else None))
    ended = time.perf_counter()
    wait_unloaded(http, model)
    run.unload_s = time.perf_counter() - ended
    return run


# -- report ------------------------------------------------------------------------


def stats(values: list[float]) -> dict:
    if not values:
        return {"median": 0.0, "min": 0.0, "max": 0.0}
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def report(args: argparse.Namespace, runs: list[Run], setup: dict) -> None:
    def sec(v: float | None) -> str:
        return "-" if v is None else f"{v:.2f}s"

    print()
    print(
        f"{'run':>3s} {'bare ctor':>9s} {'bare proc':>9s} {'engine up':>9s} {'ctl ready':>9s} "
        f"{'cold TTFT':>9s} {'warm TTFT':>9s} {'unload':>6s}  controller says"
    )
    for r in runs:
        print(
            f"{r.index:>3d} {sec(r.bare.ctor_s):>9s} {sec(r.bare.process_s):>9s} "
            f"{sec(r.stages.get('engine_loaded')):>9s} "
            f"{sec(r.stages.get('controller_ready')):>9s} {sec(r.cold.ttft):>9s} "
            f"{1000 * r.warm_ttft:>7.1f}ms {sec(r.unload_s):>6s}  {r.controller_reason}"
        )
    summary = {
        "bare_interpreter_s": stats([r.bare.interpreter_s for r in runs]),
        "bare_import_s": stats([r.bare.import_s for r in runs]),
        "bare_ctor_s": stats([r.bare.ctor_s for r in runs]),
        "bare_process_s": stats([r.bare.process_s for r in runs]),
        "cold_ttft_s": stats([r.cold.ttft for r in runs]),
        "warm_ttft_s": stats([s.ttft for r in runs for s in r.warm if s.error is None]),
        "unload_s": stats([r.unload_s for r in runs]),
    }
    print(f"\n{'':20s} {'median':>8s} {'min':>8s} {'max':>8s}")
    labels = {
        "bare_interpreter_s": "bare: interpreter",
        "bare_import_s": "bare: imports",
        "bare_ctor_s": "bare: constructor",
        "bare_process_s": "bare: process total",
        "cold_ttft_s": "cold TTFT",
        "warm_ttft_s": "warm TTFT",
    }
    for key, label in labels.items():
        v = summary[key]
        print(f"{label:20s} {v['median']:>7.3f}s {v['min']:>7.3f}s {v['max']:>7.3f}s")

    # The cold start stage by stage: medians of the offsets from sending the request.
    breakdown = {}
    for stage in STAGES:
        values = [r.stages[stage] for r in runs if r.stages.get(stage) is not None]
        breakdown[stage] = statistics.median(values) if values else None
    summary["cold_stages_s"] = breakdown
    print("\ncold start, stage by stage (median seconds after the request was sent, in order):")
    previous = 0.0
    for stage in sorted((s for s in STAGES if breakdown[s] is not None), key=breakdown.get):
        at = breakdown[stage]
        note = ""
        if stage == "process" and breakdown.get("scheduled") and at < breakdown["scheduled"]:
            note = " (before the actor was scheduled: a worker Ray had started ahead)"
        print(f"  {at:>6.2f}s  {at - previous:>+6.2f}s  {STAGES[stage]}{note}")
        previous = at
    for stage in (s for s in STAGES if breakdown[s] is None):
        print(f"        -            {STAGES[stage]} (not found)")

    cold = summary["cold_ttft_s"]["median"]
    ctor = summary["bare_ctor_s"]["median"]
    process = summary["bare_process_s"]["median"]
    warm = summary["warm_ttft_s"]["median"]
    print(f"  cold - warm TTFT = {cold - warm:.2f}s (warm TTFT {1000 * warm:.0f} ms)")
    targets = {
        f"cold_ttft_le_bare_ctor_plus_{TARGET_MARGIN}s": cold <= ctor + TARGET_MARGIN,
        "cold_requests_all_succeeded": all(r.cold.error is None for r in runs),
        "warm_requests_all_succeeded": all(s.error is None for r in runs for s in r.warm),
    }
    info = {f"cold_ttft_le_bare_process_plus_{TARGET_MARGIN}s": cold <= process + TARGET_MARGIN}
    print()
    for name, ok in targets.items():
        print(f"  {'PASS' if ok else 'FAIL'}  {name}")
    for name, ok in info.items():
        print(f"  ({'pass' if ok else 'fail'}) {name}  (for information)")
    print(
        f"  cold TTFT {cold:.2f}s vs bare ctor {ctor:.2f}s + {TARGET_MARGIN}s = "
        f"{ctor + TARGET_MARGIN:.2f}s; vs bare process {process:.2f}s + {TARGET_MARGIN}s = "
        f"{process + TARGET_MARGIN:.2f}s"
    )
    write_results(
        args.out,
        "cold_start",
        args.json,
        {
            **setup,
            "runs": args.runs,
            "warm_per_run": args.warm,
            "ctx": args.ctx,
            "threads": args.threads,
            "max_tokens": args.max_tokens,
            "primed": not args.no_prime,
            "cpu_count": os.cpu_count(),
            "summary": summary,
            "runs_detail": [
                {**asdict(r), "warm_ttft_s": r.warm_ttft, "cold_ttft_s": r.cold.ttft} for r in runs
            ],
            "targets": targets,
            "for_information": info,
        },
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--runs", type=int, default=3, help="timed cold starts")
    parser.add_argument("--warm", type=int, default=3, help="warm requests after each cold one")
    parser.add_argument("--ctx", type=int, default=2048)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--max-tokens", type=int, default=8)
    parser.add_argument(
        "--settle", type=float, default=1.0, help="quiet seconds before each cold request"
    )
    parser.add_argument("--no-prime", action="store_true", help="skip the untimed cold start")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    parser.add_argument("--json", type=Path, help="write the results here instead of --out")
    args = parser.parse_args()
    args.warm = max(1, args.warm)

    import ray

    from deployments.actors import CONTROLLER_ACTOR, NAMESPACE
    from nodes.models import STARTER_MODEL

    print(
        f"model={STARTER_MODEL} ctx={args.ctx} threads={args.threads} runs={args.runs} "
        f"warm={args.warm} max_tokens={args.max_tokens}",
        flush=True,
    )
    runs: list[Run] = []
    started = time.monotonic()
    with homelab(NODES) as lab:
        settings = {"num_ctx": args.ctx, "num_threads": args.threads}
        with corral_on(lab, **settings) as running, httpx.Client(base_url=running.url) as http:
            controller = ray.get_actor(CONTROLLER_ACTOR, namespace=NAMESPACE)
            report_ = ray.get(controller.apply.remote([model_spec(args)]), timeout=300)
            if report_.failed:
                raise RuntimeError(f"apply failed: {report_.failed}")
            wait_unloaded(http, STARTER_MODEL)  # min 0: nothing runs yet
            up = time.monotonic() - started
            print(f"  corral up, {STARTER_MODEL} declared with 0 to 1 replicas ({up:.0f}s)")
            if not args.no_prime:
                one_run(0, http, controller, lab, args)
                print("  primed (one untimed cold start)", flush=True)
            for i in range(1, args.runs + 1):
                run = one_run(i, http, controller, lab, args)
                runs.append(run)
                print(
                    f"  run {i}: cold TTFT {run.cold.ttft:.2f}s, warm {1000 * run.warm_ttft:.0f}"
                    f" ms, bare ctor {run.bare.ctor_s:.2f}s",
                    flush=True,
                )
    report(args, runs, {"model": STARTER_MODEL, "wall_s": time.monotonic() - started})


if __name__ == "__main__":
    run_main(main)
