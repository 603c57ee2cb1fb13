"""How fast is the planner, and how close to the best placement does it get?

Two parts, both on random clusters (seeded: the same seed gives the same clusters):

  speed    clusters of 100 nodes (RAM 8-128 GiB, a third with 1-2 GPUs of 8-48 GiB,
           a few down, labels for role, GPU and rack) with 50 model specs (shapes
           around tests/support/models.py LIBRARY, min replicas 1-3, some limited to
           nodes, labels or the GPU, some pinned). Times ``plan(...)`` from scratch,
           re-planning with the previous plan as ``current`` (nothing to do),
           re-planning after the busiest node went down, and from scratch on the same
           cluster with a third of its memory (models short of replicas give them
           back and get explained). Target: median and max < 100 ms.

  quality  many small homelabs (2-4 nodes, 3-6 models from LIBRARY, min replicas
           1-2, some constraints). An exhaustive search finds the most models that
           can be fully placed (every one of their min replicas); the planner's count
           is compared with it. Target: planner / best, summed over homelabs, >= 95%.

The exhaustive search uses the planner's own feasibility rules, so that the gap it
shows is the planner's choices and nothing else:

- a node may take a model only if the planner would not exclude it (up, named by
  placement.nodes, labels equal, a GPU for gpu: required, some RAM offered);
- a replica's memory is ``estimate_memory`` / ``fit_gpu_layers`` as in the planner:
  CPU only for gpu: never or a node without VRAM; every layer (n_layers + 1) for
  gpu: required; for gpu: auto the most GPU layers whose VRAM fits what is still
  free on that node *when the model is placed*, the rest in RAM;
- the replicas of a model on one node are one placement with one setting: k of
  them need k times its RAM and VRAM, and under gpu: auto each gets the most
  layers that fit 1/k of the node's free VRAM;
- a model's replicas are placed together, models one after another: the search
  tries every order of models (the order decides who gets the VRAM) and every way
  to put each model's min replicas on its allowed nodes. Spread/pack is a
  preference, not a constraint, for both. Pinned models are left out here (the
  planner deliberately serves them first, which the count does not reward).

A model the planner cannot give all its min replicas gives back what it got and
only takes what is left at the end, so its partial replicas never cost another
model its place: every set of models the planner fully places is one the search
also considers, and planner <= best always holds (the script checks it).

Run: .venv/bin/python bench/planner.py   (--homelabs 200 --runs 5 --seed 1)
Results go to bench/results/planner-<time>.json.
"""

from __future__ import annotations

import argparse
import functools
import itertools
import json
import os
import random
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cluster.planner import Plan, PlanNode, plan  # noqa: E402
from cluster.spec import ModelSpec  # noqa: E402
from nodes.gguf import GgufInfo, estimate_memory, fit_gpu_layers  # noqa: E402
from tests.support.models import LIBRARY, MB, synthetic_gguf  # noqa: E402

GIB = 1024**3
MIB = 1024**2
SPEED_TARGET_MS = 100.0
QUALITY_TARGET = 0.95
CONTEXTS = (2048, 4096, 8192, 16384)
GPU_NAMES = ("nvidia-geforce-rtx-3060", "nvidia-geforce-rtx-3090", "nvidia-rtx-a6000")


# -- random clusters ---------------------------------------------------------------


def offered_ram(total_gib: int) -> int:
    """What ``corral node start`` offers of a box: RAM minus the 2 GiB reserve and the
    object store (5% of RAM, 128 MiB to 1 GiB)."""
    total = total_gib * GIB
    return total - 2 * GIB - max(128 * MIB, min(1024 * MIB, total // 20))


def random_node(rng: random.Random, name: str, *, role: str = "worker") -> PlanNode:
    ram_gib = rng.choice((8, 8, 16, 16, 32, 32, 64, 96, 128))
    gpus = rng.choice((0, 0, 0, 0, 1, 1, 2)) if ram_gib >= 16 else 0
    per_gpu = rng.choice((8, 12, 16, 24, 24, 48)) * GIB
    vram = gpus * (per_gpu - 512 * MIB)
    labels = {
        "corral.node": name,
        "corral.gpu": rng.choice(GPU_NAMES) if gpus else "none",
        "corral.role": role,
        "rack": rng.choice(("a", "b", "c")),
    }
    return PlanNode(
        name=name,
        up=rng.random() > 0.08,
        ram=offered_ram(ram_gib),
        vram=vram,
        gpus=gpus,
        cores=rng.choice((4, 4, 8, 16)),
        labels=labels,
    )


def random_model(rng: random.Random, name: str) -> GgufInfo:
    """A model shaped like one of LIBRARY's, its file 0.7-1.3 times as large."""
    base = LIBRARY[rng.choice(sorted(LIBRARY))]
    tied = base.tied_head_bytes > 0
    return synthetic_gguf(
        name,
        layers=base.n_layers,
        n_embd=base.n_embd,
        n_head=base.n_head,
        n_head_kv=base.n_head_kv[0],
        n_vocab=base.n_vocab,
        file_bytes=int(base.file_size * rng.uniform(0.7, 1.3)) // MB * MB,
        n_ctx_train=base.n_ctx_train,
        tied=tied,
    )


def random_spec(rng: random.Random, name: str, nodes: Sequence[PlanNode]) -> ModelSpec:
    low = rng.randint(1, 3)
    placement: dict = {"strategy": rng.choice(("spread", "spread", "pack"))}
    roll = rng.random()
    if roll < 0.15:
        placement["nodes"] = sorted(n.name for n in rng.sample(list(nodes), rng.randint(3, 10)))
    elif roll < 0.25:
        placement["labels"] = {"rack": rng.choice(("a", "b", "c"))}
    elif roll < 0.30:
        placement["labels"] = {"corral.gpu": "none"}
    roll = rng.random()
    if roll < 0.10:
        placement["gpu"] = "required"
    elif roll < 0.20:
        placement["gpu"] = "never"
    return ModelSpec(
        name=name,
        context=rng.choice(CONTEXTS),
        replicas={"min": low, "max": low + rng.randint(0, 2)},
        placement=placement,
        pinned=rng.random() < 0.1,
    )


def speed_cluster(
    seed: int, n_nodes: int, n_models: int
) -> tuple[list[PlanNode], list[ModelSpec], dict[str, GgufInfo]]:
    rng = random.Random(seed)
    nodes = [random_node(rng, "node-000", role="head")]
    nodes += [random_node(rng, f"node-{i:03d}") for i in range(1, n_nodes)]
    models = {f"model-{i:02d}:latest": random_model(rng, f"model-{i:02d}") for i in range(n_models)}
    specs = [random_spec(rng, name, nodes) for name in models]
    return nodes, specs, models


# -- speed --------------------------------------------------------------------------


def timed(fn) -> tuple[float, Plan]:
    started = time.perf_counter()
    result = fn()
    return (time.perf_counter() - started) * 1000, result


def run_speed(args: argparse.Namespace) -> dict:
    cases = ("fresh", "re-plan, no change", "re-plan, node down", "fresh, memory short")
    times: dict[str, list[float]] = {case: [] for case in cases}
    sizes = []
    for run in range(args.runs):
        nodes, specs, models = speed_cluster(args.seed * 1000 + run, args.nodes, args.models)

        def go(nodes=nodes, current=(), specs=specs, models=models):
            return plan(nodes, specs, list(current), models=models)

        ms, first = timed(go)
        times["fresh"].append(ms)
        ms, again = timed(lambda first=first, go=go: go(current=first.placements))
        times["re-plan, no change"].append(ms)
        # The node with the most placements goes down: its replicas must move.
        load: dict[str, int] = {}
        for p in first.placements:
            load[p.node] = load.get(p.node, 0) + p.replicas
        busiest = max(load, key=load.__getitem__)
        down = [replace(n, up=False) if n.name == busiest else n for n in nodes]
        ms, moved = timed(lambda first=first, go=go, down=down: go(down, first.placements))
        times["re-plan, node down"].append(ms)
        assert again.placements == first.placements, "re-planning the same cluster moved replicas"
        # The same cluster with a third of the memory: many models cannot get all they need,
        # so the planner also takes replicas back and explains, node by node, why.
        small = [replace(n, ram=n.ram // 3, vram=n.vram // 3) for n in nodes]
        ms, short = timed(lambda go=go, small=small: go(small))
        times["fresh, memory short"].append(ms)
        sizes.append(
            {
                "placements": len(first.placements),
                "replicas": sum(p.replicas for p in first.placements),
                "unplaced": len(first.unplaced),
                "unplaced_memory_short": len(short.unplaced),
                "moved_after_node_down": len(set(first.placements) ^ set(moved.placements)),
            }
        )
    rows = []
    for case, values in times.items():
        rows.append(
            {
                "case": case,
                "runs": len(values),
                "median_ms": statistics.median(values),
                "max_ms": max(values),
                "ok": max(values) < SPEED_TARGET_MS,
            }
        )
    print(
        f"\nspeed: {args.nodes} nodes x {args.models} models, {args.runs} random clusters "
        f"(median {statistics.median(s['replicas'] for s in sizes):.0f} replicas placed, "
        f"{statistics.median(s['unplaced'] for s in sizes):.0f} models short, "
        f"{statistics.median(s['unplaced_memory_short'] for s in sizes):.0f} with memory short)"
    )
    target = f"target < {SPEED_TARGET_MS:.0f}"
    print(f"{'case':22s} {'runs':>4s} {'median ms':>9s} {'max ms':>7s}  {target}")
    for row in rows:
        print(
            f"{row['case']:22s} {row['runs']:>4d} {row['median_ms']:>9.1f} {row['max_ms']:>7.1f}  "
            f"{'PASS' if row['ok'] else 'FAIL'}"
        )
    return {"rows": rows, "clusters": sizes}


# -- quality ------------------------------------------------------------------------


def small_homelab(
    rng: random.Random,
) -> tuple[list[PlanNode], list[ModelSpec], dict[str, GgufInfo]]:
    nodes = []
    for i in range(rng.randint(2, 4)):
        ram_gib = rng.choice((8, 8, 16, 16, 32, 64))
        gpu_gib = rng.choice((0, 0, 0, 8, 12, 24)) if ram_gib >= 16 else 0
        nodes.append(
            PlanNode(
                name=f"box{i}",
                up=rng.random() > 0.05,
                ram=offered_ram(ram_gib),
                vram=max(0, gpu_gib * GIB - 512 * MIB),
                gpus=1 if gpu_gib else 0,
                cores=4,
                labels={
                    "corral.node": f"box{i}",
                    "corral.gpu": "gpu" if gpu_gib else "none",
                    "corral.role": "head" if i == 0 else "worker",
                },
            )
        )
    models: dict[str, GgufInfo] = {}
    specs = []
    for i, base in enumerate(rng.sample(sorted(LIBRARY) * 2, rng.randint(3, 6))):
        name = f"{base.split(':')[0]}-{i}:{base.split(':')[1]}"
        models[name] = replace(LIBRARY[base], path=f"/models/{name}.gguf")
        placement: dict = {"strategy": rng.choice(("spread", "pack"))}
        roll = rng.random()
        if roll < 0.12:
            placement["nodes"] = sorted(n.name for n in rng.sample(nodes, rng.randint(1, 2)))
        elif roll < 0.20:
            placement["labels"] = {"corral.gpu": "none"}
        roll = rng.random()
        if roll < 0.08:
            placement["gpu"] = "required"
        elif roll < 0.16:
            placement["gpu"] = "never"
        low = rng.choice((1, 1, 2))
        specs.append(
            ModelSpec(
                name=name,
                context=rng.choice(CONTEXTS),
                replicas={"min": low, "max": low},
                placement=placement,
            )
        )
    return nodes, specs, models


def allowed(spec: ModelSpec, node: PlanNode) -> bool:
    """The planner's ``_excluded`` rules, as a yes/no."""
    where = spec.placement
    return (
        node.up
        and (where.nodes is None or node.name in where.nodes)
        and all(node.labels.get(k) == v for k, v in where.labels.items())
        and not (where.gpu == "required" and node.vram == 0)
        and node.ram > 0
    )


class Exhaustive:
    """The most models of one homelab that can be fully placed, by trying everything."""

    def __init__(self, nodes: list[PlanNode], specs: list[ModelSpec], models: dict) -> None:
        self.nodes = [n for n in nodes if n.up]
        self.specs = specs
        self.models = models
        self.choices = {}  # spec index -> the ways to put its min replicas on allowed nodes
        for i, spec in enumerate(specs):
            where = [j for j, n in enumerate(self.nodes) if allowed(spec, n)]
            ways = itertools.combinations_with_replacement(where, spec.replicas.min)
            self.choices[i] = list(ways)
        self.states = 0

    @functools.cache  # noqa: B019 - one instance per homelab
    def replica(self, i: int, j: int, free_vram: int) -> tuple[int, int]:
        """RAM and VRAM of a replica of spec ``i`` on node ``j`` whose share of the free
        VRAM is ``free_vram`` (the planner's ``_fit``)."""
        spec, node = self.specs[i], self.nodes[j]
        info = self.models[spec.name]
        context = spec.context or 4096
        shape = {"parallel": spec.slots, "llama": spec.llama_settings()}  # as the planner's
        if spec.placement.gpu == "never" or node.vram == 0:
            est = estimate_memory(info, context, **shape)
        elif spec.placement.gpu == "required":
            layers = info.n_layers + 1
            est = estimate_memory(info, context, gpu_layers=layers, gpus=node.gpus, **shape)
        else:
            est = fit_gpu_layers(info, context, free_vram, gpus=max(node.gpus, 1), **shape)
        return est.ram, est.vram

    def place(self, i: int, choice: tuple[int, ...], ram: tuple, vram: tuple):
        """The free memory after placing spec ``i`` as ``choice`` says, or None."""
        ram, vram = list(ram), list(vram)
        for j in set(choice):
            k = choice.count(j)
            r, v = self.replica(i, j, vram[j] // k)  # k replicas share one setting
            if k * r > ram[j] or k * v > vram[j]:
                return None
            ram[j] -= k * r
            vram[j] -= k * v
        return tuple(ram), tuple(vram)

    def best(self) -> tuple[int, list[str]]:
        """The most models that can be fully placed, and one way to do it (in order)."""
        ram = tuple(n.ram for n in self.nodes)
        vram = tuple(n.vram for n in self.nodes)
        count, way = self._best(frozenset(range(len(self.specs))), ram, vram)
        shown = []
        for i, choice in way:
            counts = sorted((self.nodes[j].name, choice.count(j)) for j in set(choice))
            nodes = ", ".join(f"{name} x{k}" for name, k in counts)
            shown.append(f"{self.specs[i].name} on {nodes}")
        return count, shown

    @functools.cache  # noqa: B019
    def _best(self, left: frozenset, ram: tuple, vram: tuple) -> tuple[int, tuple]:
        self.states += 1
        # What cannot be placed now never can: memory only shrinks, and less free
        # VRAM means fewer GPU layers, so more RAM, never less.
        options = {}
        for i in sorted(left):
            after = [(c, s) for c in self.choices[i] if (s := self.place(i, c, ram, vram))]
            if after:
                options[i] = after
        best: tuple[int, tuple] = (0, ())
        for i, after in options.items():
            rest = frozenset(options) - {i}
            for choice, (r, v) in after:
                count, way = self._best(rest, r, v)
                if count + 1 > best[0]:
                    best = (count + 1, ((i, choice), *way))
                if best[0] == len(options):
                    return best
        return best


def run_quality(args: argparse.Namespace) -> dict:
    rng = random.Random(args.seed)
    total_best = total_planner = 0
    cases = []
    started = time.perf_counter()
    for h in range(args.homelabs):
        nodes, specs, models = small_homelab(rng)
        search = Exhaustive(nodes, specs, models)
        best, way = search.best()
        result = plan(nodes, specs, [], models=models)
        placed = len(specs) - len(result.unplaced)
        assert placed <= best, f"homelab {h}: the planner placed {placed}, the search {best}"
        total_best += best
        total_planner += placed
        cases.append(
            {
                "homelab": h,
                "nodes": [
                    f"{n.name}: {n.ram / GIB:.1f} GiB RAM, {n.vram / GIB:.1f} GiB VRAM"
                    + ("" if n.up else " (down)")
                    for n in nodes
                ],
                "models": [
                    f"{s.name} x{s.replicas.min} ctx {s.context} gpu {s.placement.gpu}"
                    + (f" nodes {s.placement.nodes}" if s.placement.nodes else "")
                    + (f" labels {s.placement.labels}" if s.placement.labels else "")
                    for s in specs
                ],
                "best": best,
                "planner": placed,
                "states": search.states,
                "unplaced": [u.model for u in result.unplaced],
                "best_way": way,
                "planner_way": [
                    f"{p.model} on {p.node} x{p.replicas} ({p.gpu_layers} GPU layers)"
                    for p in result.placements
                ],
            }
        )
    ratio = total_planner / total_best if total_best else 1.0
    worst = sorted(cases, key=lambda c: (c["planner"] - c["best"], c["homelab"]))
    worst = [c for c in worst if c["planner"] < c["best"]][: args.worst]
    print(
        f"\nquality: {args.homelabs} homelabs of 2-4 nodes and 3-6 models "
        f"({time.perf_counter() - started:.1f} s; the largest search visited "
        f"{max(c['states'] for c in cases)} states)"
    )
    target = f"target >= {QUALITY_TARGET:.0%}"
    print(f"{'models':>6s} {'best':>6s} {'planner':>7s} {'ratio':>7s}  {target}")
    n_models = sum(len(c["models"]) for c in cases)
    print(
        f"{n_models:>6d} {total_best:>6d} {total_planner:>7d} {ratio:>7.1%}  "
        f"{'PASS' if ratio >= QUALITY_TARGET else 'FAIL'}"
    )
    short = sum(c["planner"] < c["best"] for c in cases)
    print(f"homelabs where the planner placed fewer than the best: {short}/{len(cases)}")
    for c in worst:
        print(f"\n  homelab {c['homelab']}: best {c['best']}, planner {c['planner']}")
        for line in c["nodes"]:
            print(f"    {line}")
        for line in c["models"]:
            print(f"    {line}")
        print(f"    best, placed in this order: {'; '.join(c['best_way'])}")
        print(f"    planner: {'; '.join(c['planner_way'])}")
        print(f"    planner left out: {', '.join(c['unplaced'])}")
    return {
        "best": total_best,
        "planner": total_planner,
        "ratio": ratio,
        "ok": ratio >= QUALITY_TARGET,
        "short": short,
        "worst": worst,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--runs", type=int, default=5, help="random clusters timed")
    parser.add_argument("--nodes", type=int, default=100)
    parser.add_argument("--models", type=int, default=50)
    parser.add_argument("--homelabs", type=int, default=200, help="small homelabs searched")
    parser.add_argument("--worst", type=int, default=3, help="worst homelabs printed")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args()

    print(f"seed={args.seed} python={sys.version.split()[0]} cpus={os.cpu_count()}", flush=True)
    speed = run_speed(args)
    quality = run_quality(args)
    args.out.mkdir(parents=True, exist_ok=True)
    out = args.out / f"planner-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.write_text(
        json.dumps(
            {
                "seed": args.seed,
                "nodes": args.nodes,
                "models": args.models,
                "homelabs": args.homelabs,
                "cpu_count": os.cpu_count(),
                "speed": speed,
                "quality": quality,
            },
            indent=2,
        )
    )
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
