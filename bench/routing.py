"""Does least-loaded routing beat round-robin when one box is faster than the others?

A simulated homelab of three Ray nodes (one logical CPU each): ``fast`` and two
slow boxes, ``slow1`` and ``slow2``. A fake model (``engine: fake``: fixed
words at a set pace, almost no CPU) runs one replica on each node (replicas
min = max = 3, strategy spread); ``token_delay_by_node`` makes the slow boxes
4x slower per token. Each replica generates one reply at a time and queues
the rest, like llama.cpp.

``--clients`` closed-loop clients (asyncio + httpx, one request at a time each,
non-streamed chat completions) keep the cluster saturated. For each routing
strategy (least_loaded, round_robin, random) the ingress is redeployed with that
``routing`` setting (the controller and the warm replicas stay), the load runs
``--warmup`` seconds, then ``--seconds`` of measurement:

  latency     p50 / p99 of the requests *sent* in the window (run to completion)
  req/s       requests *completed* in the window per second
  errors      failed requests sent in the window (HTTP status, transport error)
  share       which node finished how many of the window's generations
              (the replicas' own counters, before and after the window)

Between strategies the clients stop (their requests are cancelled) and the
replicas drain. With ``--rounds`` > 1 the strategies take turns round by round,
so a shared box getting busier or quieter affects every strategy alike; the
numbers pool all rounds. Ratios are against round_robin in the same run.
Targets: least_loaded p99 <= 0.8 x round_robin p99, and least_loaded req/s >=
round_robin's. Results go to bench/results/routing-<time>.json (or --json PATH).

Run: .venv/bin/python bench/routing.py                 (about 2.5 minutes a round)
     .venv/bin/python bench/routing.py --seconds 5 --warmup 3 --clients 16 --rounds 1
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import httpx
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _cluster import (  # noqa: E402
    SimNode,
    corral_on,
    homelab,
    run_main,
    wait_until,
    write_results,
)

MODEL = "fakechat:latest"
NODES = [
    SimNode("minipc-n100-ram16g", "head", "fast"),
    SimNode("nas-ram8g", "worker", "slow1"),
    SimNode("laptop-i5-8250u-ram8g", "worker", "slow2"),
]
FAST, SLOW = "fast", ("slow1", "slow2")
STRATEGIES = ("least_loaded", "round_robin", "random")
BASELINE = "round_robin"


@dataclass
class Sample:
    started: float
    ended: float
    error: str | None


@dataclass
class Phase:
    """One strategy's measured window in one round."""

    strategy: str
    round: int
    window: float = 0.0
    samples: list[Sample] = field(default_factory=list)  # sent in the window
    completed_ok: int = 0  # completed in the window (sent before it or in it)
    finished_by_node: dict[str, int] = field(default_factory=dict)
    unfinished: int = 0  # sent in the window, still running when we gave up waiting
    cpu_percent: float = 0.0  # the whole box's CPU use during the window


# -- the cluster -------------------------------------------------------------------


def model_spec(args: argparse.Namespace):
    from cluster.spec import ModelSpec
    from nodes.models import starter_model_path

    return ModelSpec(
        name=MODEL,
        source=str(starter_model_path()),  # the planner sizes replicas from its GGUF header
        context=2048,
        threads=1,
        replicas={"min": 3, "max": 3},
        placement={"strategy": "spread", "gpu": "never"},
        keep_alive=-1,
        engine="fake",
        engine_options={
            "token_delay": args.fast_delay,
            "token_delay_by_node": {FAST: args.fast_delay, **dict.fromkeys(SLOW, args.slow_delay)},
            "reply_tokens": args.reply_tokens,
        },
    )


def deploy_model(args: argparse.Namespace) -> None:
    import ray

    from deployments.actors import CONTROLLER_ACTOR, NAMESPACE

    controller = ray.get_actor(CONTROLLER_ACTOR, namespace=NAMESPACE)
    report = ray.get(controller.apply.remote([model_spec(args)]), timeout=300)
    if report.failed:
        raise RuntimeError(f"the fake model did not load: {report.failed}")
    nodes = sorted(p.node for p in report.plan.for_model(MODEL))
    if nodes != sorted([FAST, *SLOW]):
        raise RuntimeError(f"expected one replica on each node, the planner chose {nodes}")


def replica_handles() -> dict:
    from ray import serve

    from cluster.serve_apps import app_name_for
    from deployments.replica import REPLICA_DEPLOYMENT

    return {
        node: serve.get_deployment_handle(REPLICA_DEPLOYMENT, app_name_for(MODEL, node))
        for node in (FAST, *SLOW)
    }


def replica_stats(handles: dict) -> dict:
    return {node: h.stats.remote().result(timeout_s=30) for node, h in handles.items()}


def set_routing(running, strategy: str) -> None:
    """Redeploy only the ingress with ``strategy``; return once the old one is gone.

    The same ``IngressConfig`` as ``start_corral`` builds, with another ``routing``.
    """
    import ray
    from ray import serve

    from cluster.server import corral_version
    from deployments.ingress import INGRESS_APP, IngressConfig, ingress_app
    from nodes.agent import LABEL_NODE

    if running.settings.routing == strategy:
        return
    s = running.settings
    host, port = s.listen
    config = IngressConfig(
        host=host,
        port=port,
        version=corral_version(),
        log_level=s.log_level,
        routing=strategy,
        load_timeout=s.load_timeout,
    )
    name = ray.get_runtime_context().get_node_labels().get(LABEL_NODE)
    labels = {LABEL_NODE: name} if name else None
    serve.run(ingress_app(config, node_labels=labels), name=INGRESS_APP, route_prefix=None)

    def only_the_new_one() -> bool:
        app = serve.status().applications.get(INGRESS_APP)
        if app is None or app.status != "RUNNING":
            return False
        states = {k: v for d in app.deployments.values() for k, v in d.replica_states.items()}
        return {k: v for k, v in states.items() if v} == {"RUNNING": 1}

    wait_until(only_the_new_one, timeout=120, interval=0.25, what="the new ingress alone")
    wait_until(lambda: _answers(running.url), timeout=60, what="the API answering")
    running.settings = s.model_copy(update={"routing": strategy})


def _answers(url: str) -> bool:
    try:
        return httpx.get(url + "/", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


# -- the load ----------------------------------------------------------------------


class Load:
    """``clients`` closed-loop clients on an event loop of their own (a thread), so that
    this thread may make blocking Ray calls while they run."""

    def __init__(self, url: str, args: argparse.Namespace) -> None:
        self.url, self.clients, self.timeout = url, args.clients, args.timeout
        self.done: list[Sample] = []
        self.in_flight: dict[int, float] = {}  # client -> when its request was sent
        self._ready = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._failed: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="load", daemon=True)

    def __enter__(self) -> Load:
        self._thread.start()
        self._ready.wait(30)
        if self._failed:
            raise self._failed
        return self

    def __exit__(self, *exc: object) -> None:
        if self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(60)

    def _run(self) -> None:
        try:
            asyncio.run(self._main())
        except BaseException as exc:  # noqa: BLE001 - reported to the caller
            self._failed = exc
            self._ready.set()

    async def _main(self) -> None:
        self._loop, self._stop = asyncio.get_running_loop(), asyncio.Event()
        n = self.clients
        limits = httpx.Limits(max_connections=n, max_keepalive_connections=n)
        http = httpx.AsyncClient(base_url=self.url, timeout=self.timeout, limits=limits)
        async with http:
            tasks = [asyncio.create_task(self._client(http, i)) for i in range(self.clients)]
            self._ready.set()
            await self._stop.wait()
            for t in tasks:
                t.cancel()  # closes the connections: the replicas drop what they hold
            await asyncio.gather(*tasks, return_exceptions=True)

    async def _client(self, http: httpx.AsyncClient, i: int) -> None:
        n = 0
        while not self._stop.is_set():
            n += 1
            body = {
                "model": MODEL,
                "messages": [{"role": "user", "content": f"client {i} request {n}: hello"}],
            }
            started = time.perf_counter()
            self.in_flight[i] = started
            error = None
            try:
                r = await http.post("/v1/chat/completions", json=body)
                if r.status_code != 200:
                    error = f"HTTP {r.status_code}"
                elif not r.json()["choices"][0]["message"]["content"]:
                    error = "empty reply"
            except (httpx.HTTPError, ValueError, KeyError) as exc:
                error = type(exc).__name__
            finally:
                self.in_flight.pop(i, None)
            self.done.append(Sample(started, time.perf_counter(), error))
            if error:
                await asyncio.sleep(0.1)  # no hot loop against a failing server

    def sent_in(self, w0: float, w1: float) -> int:
        """Requests sent in [w0, w1) that are still running."""
        return sum(1 for t in list(self.in_flight.values()) if w0 <= t < w1)


def run_phase(url: str, handles: dict, args: argparse.Namespace, phase: Phase) -> None:
    """Warm up, measure a window, keep the load on until the window's requests finish."""
    with Load(url, args) as load:
        time.sleep(args.warmup)
        before = replica_stats(handles)
        psutil.cpu_percent()
        w0 = time.perf_counter()
        time.sleep(args.seconds)
        phase.cpu_percent = psutil.cpu_percent()
        after = replica_stats(handles)
        w1 = time.perf_counter()
        deadline = time.monotonic() + args.timeout
        while load.sent_in(w0, w1) and time.monotonic() < deadline:
            time.sleep(0.05)
        phase.unfinished = load.sent_in(w0, w1)
    done = list(load.done)
    phase.window = w1 - w0
    phase.samples = [s for s in done if w0 <= s.started < w1]
    phase.completed_ok = sum(1 for s in done if s.error is None and w0 <= s.ended < w1)
    phase.finished_by_node = {n: after[n].finished - before[n].finished for n in handles}


def drain(handles: dict, timeout: float = 60) -> None:
    """Wait until no replica holds a request (cancelled ones included)."""

    def idle() -> bool:
        return all(s.pending == 0 for s in replica_stats(handles).values())

    wait_until(idle, timeout=timeout, interval=0.25, what="idle replicas")


# -- report ------------------------------------------------------------------------


def percentile(values: list[float], q: float) -> float:
    """The ``q`` quantile (0..1) by linear interpolation; 0 for no values."""
    if not values:
        return 0.0
    ordered = sorted(values)
    pos = q * (len(ordered) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def summarize(strategy: str, phases: list[Phase]) -> dict:
    samples = [s for p in phases for s in p.samples]
    ok = [s.ended - s.started for s in samples if s.error is None]
    window = sum(p.window for p in phases)
    by_node: dict[str, int] = {}
    for p in phases:
        for node, n in p.finished_by_node.items():
            by_node[node] = by_node.get(node, 0) + n
    total = sum(by_node.values()) or 1
    errors = [s.error for s in samples if s.error] + ["unfinished"] * sum(
        p.unfinished for p in phases
    )
    return {
        "strategy": strategy,
        "sent": len(samples),
        "ok": len(ok),
        "errors": len(errors),
        "error_kinds": {e: errors.count(e) for e in sorted(set(errors))},
        "p50_s": percentile(ok, 0.50),
        "p99_s": percentile(ok, 0.99),
        "mean_s": statistics.fmean(ok) if ok else 0.0,
        "max_s": max(ok, default=0.0),
        "req_per_s": sum(p.completed_ok for p in phases) / window if window else 0.0,
        "window_s": window,
        "box_cpu_percent": statistics.fmean(p.cpu_percent for p in phases) if phases else 0.0,
        "finished_by_node": by_node,
        "share_by_node": {n: c / total for n, c in by_node.items()},
    }


def paired_by_round(phases: list[Phase]) -> list[dict]:
    """least_loaded against round_robin within each round (the same state of the box)."""
    pairs = []
    for rnd in sorted({p.round for p in phases}):
        got = {p.strategy: summarize(p.strategy, [p]) for p in phases if p.round == rnd}
        ll, rr = got.get("least_loaded"), got.get(BASELINE)
        if ll and rr and rr["p99_s"] and rr["req_per_s"]:
            pairs.append(
                {
                    "round": rnd,
                    "p99_ratio": ll["p99_s"] / rr["p99_s"],
                    "req_per_s_ratio": ll["req_per_s"] / rr["req_per_s"],
                }
            )
    return pairs


def capacity(args: argparse.Namespace) -> float:
    """Requests/s the three replicas could finish at most (one reply at a time each)."""
    per_request = {FAST: args.fast_delay, **dict.fromkeys(SLOW, args.slow_delay)}
    return sum(1 / (d * args.reply_tokens) for d in per_request.values())


def report(args: argparse.Namespace, phases: list[Phase], started: float) -> None:
    rows = [summarize(s, [p for p in phases if p.strategy == s]) for s in args.strategies]
    base = next((r for r in rows if r["strategy"] == BASELINE), None)
    for r in rows:
        if base and base["p99_s"] and base["req_per_s"]:
            r["p99_vs_round_robin"] = r["p99_s"] / base["p99_s"]
            r["p50_vs_round_robin"] = r["p50_s"] / base["p50_s"] if base["p50_s"] else None
            r["req_per_s_vs_round_robin"] = r["req_per_s"] / base["req_per_s"]
        else:
            r["p99_vs_round_robin"] = r["p50_vs_round_robin"] = None
            r["req_per_s_vs_round_robin"] = None

    print()
    head = (
        f"{'strategy':13s} {'sent':>5s} {'err':>4s} {'p50 s':>7s} {'p99 s':>7s} {'req/s':>6s} "
        f"{'fast':>5s} {'slow1':>5s} {'slow2':>5s} {'cpu':>4s} {'p99 x':>6s} {'req/s x':>7s}"
    )
    print(head)
    for r in rows:
        share = r["share_by_node"]

        def ratio(key: str, r=r) -> str:
            return f"{r[key]:.2f}" if r[key] is not None else "-"

        print(
            f"{r['strategy']:13s} {r['sent']:>5d} {r['errors']:>4d} {r['p50_s']:>7.2f} "
            f"{r['p99_s']:>7.2f} {r['req_per_s']:>6.1f} "
            f"{share.get(FAST, 0):>5.0%} {share.get('slow1', 0):>5.0%} "
            f"{share.get('slow2', 0):>5.0%} {r['box_cpu_percent']:>3.0f}% "
            f"{ratio('p99_vs_round_robin'):>6s} "
            f"{ratio('req_per_s_vs_round_robin'):>7s}"
        )
    ll = next((r for r in rows if r["strategy"] == "least_loaded"), None)
    print(
        f"\nshare = node's part of the generations finished in the window; cpu = the whole "
        f"box's CPU use in it; x = ratio to {BASELINE}.\nCapacity at most "
        f"{capacity(args):.1f} req/s "
        f"(fast {1 / (args.fast_delay * args.reply_tokens):.1f}, "
        f"each slow {1 / (args.slow_delay * args.reply_tokens):.1f})."
    )
    by_round = paired_by_round(phases)
    if by_round:
        p99 = ", ".join(f"x{r['p99_ratio']:.2f}" for r in by_round)
        tput = ", ".join(f"x{r['req_per_s_ratio']:.2f}" for r in by_round)
        print(f"least_loaded vs {BASELINE} round by round: p99 {p99}; req/s {tput}")
    targets = {}
    if ll and base:
        targets = {
            "least_loaded_p99_le_0.8x_round_robin": bool(
                ll["p99_vs_round_robin"] is not None and ll["p99_vs_round_robin"] <= 0.8
            ),
            "least_loaded_throughput_ge_round_robin": bool(
                ll["req_per_s_vs_round_robin"] is not None and ll["req_per_s_vs_round_robin"] >= 1
            ),
            "no_errors": all(r["errors"] == 0 for r in rows),
        }
        print()
        for name, ok in targets.items():
            print(f"  {'PASS' if ok else 'FAIL'}  {name}")
    write_results(
        args.out,
        "routing",
        args.json,
        {
            "model": MODEL,
            "clients": args.clients,
            "seconds": args.seconds,
            "warmup": args.warmup,
            "rounds": args.rounds,
            "fast_token_delay": args.fast_delay,
            "slow_token_delay": args.slow_delay,
            "reply_tokens": args.reply_tokens,
            "capacity_req_per_s": capacity(args),
            "nodes": [asdict(n) for n in NODES],
            "cpu_count": os.cpu_count(),
            "wall_s": time.monotonic() - started,
            "results": rows,
            "rounds_detail": [{**summarize(p.strategy, [p]), "round": p.round} for p in phases],
            "least_loaded_vs_round_robin_by_round": by_round,
            "targets": targets,
        },
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--clients", type=int, default=64, help="concurrent closed-loop clients")
    parser.add_argument("--seconds", type=float, default=20, help="measured window per strategy")
    parser.add_argument("--warmup", type=float, default=8, help="load before each window")
    parser.add_argument("--rounds", type=int, default=2, help="turns of every strategy")
    parser.add_argument("--fast-delay", type=float, default=0.005, help="s/token on fast")
    parser.add_argument("--slow-delay", type=float, default=0.02, help="s/token on slow1, slow2")
    parser.add_argument("--reply-tokens", type=int, default=16)
    parser.add_argument("--timeout", type=float, default=120, help="seconds per request")
    parser.add_argument(
        "--strategies", nargs="+", default=list(STRATEGIES), choices=STRATEGIES, metavar="S"
    )
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    parser.add_argument("--json", type=Path, help="write the results here instead of --out")
    args = parser.parse_args()

    started = time.monotonic()
    print(
        f"clients={args.clients} warmup={args.warmup:g}s window={args.seconds:g}s "
        f"rounds={args.rounds} reply={args.reply_tokens} tokens, s/token fast="
        f"{args.fast_delay:g} slow={args.slow_delay:g}",
        flush=True,
    )
    phases: list[Phase] = []
    with homelab(NODES) as lab:
        print(f"  cluster up ({time.monotonic() - started:.0f}s)", flush=True)
        with corral_on(lab, routing=args.strategies[0], num_ctx=2048) as running:
            deploy_model(args)
            handles = replica_handles()
            print(f"  corral and 3 fake replicas up ({time.monotonic() - started:.0f}s)")
            for rnd in range(1, args.rounds + 1):
                for strategy in args.strategies:
                    set_routing(running, strategy)
                    phase = Phase(strategy, rnd)
                    run_phase(running.url, handles, args, phase)
                    drain(handles)
                    phases.append(phase)
                    s = summarize(strategy, [phase])
                    print(
                        f"  round {rnd} {strategy:12s}: {s['sent']} sent, "
                        f"p99 {s['p99_s']:.2f}s, {s['req_per_s']:.1f} req/s, "
                        f"{s['errors']} errors",
                        flush=True,
                    )
    report(args, phases, started)


if __name__ == "__main__":
    run_main(main)
