"""The planner: which models run on which nodes, with how much memory, and why.

``plan(nodes, specs, current, models=...)`` is pure: plain data in, a ``Plan``
out. For every replica it must place it runs a chain (filter nodes, fit the
model on each candidate, score, pick) in which every step that drops a node
records why, so a model that cannot run comes back with a reason a person
understands: "needs 5.1 GiB RAM (context 8192, on the CPU); nas has 3.2 GiB free;
gpubox is excluded by placement.nodes".

Existing placements move only when they must: a placement whose node is still
up and allowed, and whose model's settings did not change, is kept as it is
(its GPU layers too, even if more would now fit). Then models that need more
replicas are placed, pinned models first, then those that need a GPU, then
those fewer nodes may take, then the largest first (first-fit decreasing;
picking the tightest fit keeps room for what comes next). A model that cannot
get its min replicas gives back the ones it just got, so that they do not
crowd out models that can get all theirs, and gets what is left once every
model had its turn (a pinned model keeps what it got).

Replicas of a model on one node are one placement and share its settings:
under ``gpu: auto`` they split the node's free VRAM, each taking the most GPU
layers that fit its share, the rest of the model in RAM.

A model no single node can hold (``placement.split: auto``, the default) is split:
its main replica runs on the node with the most free RAM and the rest of its blocks go
to RPC workers on the fewest other nodes that together have room, each taking blocks
in proportion to its free memory: GPU memory first (a node with a GPU lends VRAM, as
llama.cpp's ``tensor_split`` does), RAM when VRAM is not enough (``_Planner._split``).
One replica; ``placement.split: never`` refuses instead, saying what is missing.

Memory is the planner's own accounting: a node's offer (Ray's ``memory`` and
``vram_mib`` resources) minus the estimates of the placements on it, the same
numbers each replica (and RPC worker) then reserves from Ray.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Literal

from cluster.spec import ModelSpec
from nodes.engine import LlamaSettings
from nodes.gguf import GgufInfo, MemoryEstimate, estimate_memory, fit_gpu_layers

GIB = 1024**3
MIB = 1024**2
# An RPC worker's own process (Python and ggml) beside the tensors it holds.
RPC_OVERHEAD = 64 * MIB


@dataclass(frozen=True, slots=True)
class PlanNode:
    """What the planner needs to know about a node."""

    name: str
    up: bool
    ram: int  # bytes Corral may use on it
    vram: int = 0  # bytes, all GPUs together
    gpus: int = 0
    cores: int = 1
    labels: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Part:
    """Blocks of a split model that another node holds, through its RPC worker.

    The main replica keeps its blocks and the output layer; the parts hold the other
    blocks in order. ``ram`` is what its worker holds in RAM: its process and, lending
    RAM, those blocks' weights and KV cache and a compute buffer; ``vram`` (lending its
    GPUs) holds the blocks and the compute buffer instead."""

    node: str
    layers: int
    ram: int
    vram: int = 0


@dataclass(frozen=True, slots=True)
class Placement:
    """Replicas of one model on one node, with the settings and memory of each (a split
    placement: one replica, on ``node`` and, through RPC workers, on its ``parts``)."""

    model: str
    node: str
    replicas: int
    context: int
    threads: int
    gpu_layers: int
    ram: int  # bytes per replica
    vram: int  # bytes per replica
    path: str  # the GGUF file the replicas load
    reason: str = field(default="", compare=False)
    parallel: int = 1  # slots: requests each replica decodes together
    llama: LlamaSettings = field(default_factory=LlamaSettings)
    parts: tuple[Part, ...] = ()  # a split model: the layers other nodes hold
    held: int = 0  # a split model: the main replica's layers (its blocks, the output)

    def __post_init__(self) -> None:
        if isinstance(self.llama, dict):  # read back from JSON (saved state)
            object.__setattr__(self, "llama", LlamaSettings(**self.llama))
        if not isinstance(self.parts, tuple) or any(isinstance(q, dict) for q in self.parts):
            parts = tuple(Part(**q) if isinstance(q, dict) else q for q in self.parts)
            object.__setattr__(self, "parts", parts)  # read back from JSON (saved state)

    @property
    def nodes(self) -> tuple[str, ...]:
        """Every node the placement runs on: its own, then its parts'."""
        return (self.node, *(part.node for part in self.parts))

    @property
    def key(self) -> tuple[str, str]:
        return self.model, self.node

    @property
    def engine(self) -> tuple:
        """The settings a replica loads with: changing any means reloading it."""
        return (
            self.context, self.threads, self.gpu_layers, self.path, self.parallel, self.llama,
            self.parts,
        )  # fmt: skip


@dataclass(frozen=True, slots=True)
class Unplaced:
    """A model that got fewer replicas than it needs, and why."""

    model: str
    wanted: int
    placed: int
    reason: str


@dataclass(frozen=True, slots=True)
class Plan:
    placements: tuple[Placement, ...]
    unplaced: tuple[Unplaced, ...] = ()
    notes: tuple[str, ...] = ()  # warnings that do not stop anything

    def for_model(self, model: str) -> list[Placement]:
        return [p for p in self.placements if p.model == model]


@dataclass(frozen=True, slots=True)
class Change:
    """One line of a plan's diff: ``+`` add, ``-`` remove, ``~`` change."""

    op: Literal["+", "-", "~"]
    before: Placement | None
    after: Placement | None

    @property
    def placement(self) -> Placement:
        return self.after or self.before  # type: ignore[return-value]

    @property
    def reload(self) -> bool:
        """Whether the change restarts the replicas (not just adds or removes some)."""
        return self.op == "~" and self.before.engine != self.after.engine  # type: ignore[union-attr]

    def describe(self) -> str:
        p = self.placement
        head = f"{self.op} {p.model} on {p.node}"
        if self.op != "~":
            return f"{head}: {describe_placement(p)}"
        before, after = self.before, self.after
        assert before is not None and after is not None
        fields = (
            "replicas", "context", "parallel", "threads", "gpu_layers", "ram", "vram", "path"
        )  # fmt: skip
        parts = []
        for name in fields:
            old, new = getattr(before, name), getattr(after, name)
            if old != new:
                show = human_bytes if name in ("ram", "vram") else str
                parts.append(f"{name.replace('_', ' ')} {show(old)} -> {show(new)}")
        for name, new in asdict(after.llama).items():
            old = getattr(before.llama, name)
            if old != new:
                parts.append(f"llama.{name} {old} -> {new}")
        if before.parts != after.parts:
            parts.append(f"split {_split_text(before) or 'none'} -> {_split_text(after) or 'none'}")
        return f"{head}: {', '.join(parts)}"


def describe_placement(p: Placement) -> str:
    if p.parts:
        return (
            f"split: {_split_text(p)}, context {p.context}, "
            f"{p.parallel} slot{'s' if p.parallel != 1 else ''}, {p.threads} threads"
        )
    where = _device(p.gpu_layers)
    memory = f"{human_bytes(p.ram)} RAM" + (f" + {human_bytes(p.vram)} VRAM" if p.vram else "")
    return (
        f"{p.replicas} replica{'s' if p.replicas != 1 else ''}, context {p.context}, "
        f"{p.parallel} slot{'s' if p.parallel != 1 else ''}, {p.threads} threads, {where}, "
        f"{memory} each"
    )


def _split_text(p: Placement) -> str:
    """``main 12 layers (310 MiB RAM) + gpubox 19 layers (1.2 GiB VRAM)``; "" unsplit."""
    if not p.parts:
        return ""
    main = f"{human_bytes(p.ram)} RAM" + (f" + {human_bytes(p.vram)} VRAM" if p.vram else "")
    rows = [f"{p.node} {p.held} layers ({main})"]
    rows += [
        f"{q.node} {q.layers} layers ({human_bytes(q.vram)} VRAM)"
        if q.vram
        else f"{q.node} {q.layers} layers ({human_bytes(q.ram)} RAM)"
        for q in p.parts
    ]
    return " + ".join(rows)


def diff(current: Iterable[Placement], plan: Plan) -> list[Change]:
    """What applying ``plan`` changes in ``current``, removals first."""
    before = {p.key: p for p in current}
    after = {p.key: p for p in plan.placements}
    changes = [Change("-", p, None) for k, p in before.items() if k not in after]
    for key, p in after.items():
        old = before.get(key)
        if old is None:
            changes.append(Change("+", None, p))
        elif (old.replicas, old.engine) != (p.replicas, p.engine):
            changes.append(Change("~", old, p))
    return changes


def plan(
    nodes: Sequence[PlanNode],
    specs: Sequence[ModelSpec],
    current: Sequence[Placement],
    *,
    models: Mapping[str, GgufInfo],
    default_context: int = 4096,
    default_threads: int | None = None,
) -> Plan:
    """Placements for ``specs`` on ``nodes``, keeping what runs in ``current`` where it may.

    ``models`` holds the GGUF facts of each spec's model, by spec name.
    ``default_context`` and ``default_threads`` apply where a spec sets none
    (threads default to the node's cores).
    """
    planner = _Planner(nodes, models, default_context, default_threads)
    by_model: dict[str, list[Placement]] = {}
    for p in current:
        by_model.setdefault(p.model, []).append(p)
    order = sorted(specs, key=planner.priority)
    for spec in order:
        planner.keep(spec, by_model.get(spec.name, []))
    targets = {
        spec.name: _target(spec, sum(p.replicas for p in by_model.get(spec.name, [])))
        for spec in specs
    }
    short = [spec for spec in order if not planner.fill(spec, targets[spec.name])]
    for spec in short:  # what is left goes to the models that cannot get all they need
        planner.fill(spec, targets[spec.name], partial=True)
    return planner.result(specs)


def _target(spec: ModelSpec, running: int) -> int:
    """Replicas a model should have: what runs, kept within min..max."""
    return max(spec.replicas.min, min(running, spec.replicas.max))


class _Planner:
    """The state of one ``plan`` call: free memory per node and placements so far."""

    def __init__(
        self,
        nodes: Sequence[PlanNode],
        models: Mapping[str, GgufInfo],
        default_context: int,
        default_threads: int | None,
    ) -> None:
        self.nodes = {n.name: n for n in nodes}
        self.models = models
        self.default_context = default_context
        self.default_threads = default_threads
        self.free_ram = {n.name: n.ram for n in nodes}
        self.free_vram = {n.name: n.vram for n in nodes}
        self.placed: dict[tuple[str, str], Placement] = {}
        self.running: set[tuple[str, str]] = set()  # placements kept exactly as they run
        self.failures: dict[str, str] = {}  # model -> why its last replica found no node
        self.notes: list[str] = []
        self._estimates: dict[tuple[str, int, int, int], MemoryEstimate] = {}
        self._allowed_nodes: dict[str, set[str]] = {}

    # -- the steps -----------------------------------------------------------

    def keep(self, spec: ModelSpec, existing: list[Placement]) -> None:
        """Keep existing placements of ``spec`` that may stay, up to its replica target."""
        budget = _target(spec, sum(p.replicas for p in existing))
        for p in sorted(existing, key=lambda p: (-p.replicas, p.node)):
            node = self.nodes.get(p.node)
            if budget == 0 or node is None or self._excluded(spec, node) is not None:
                continue
            replicas = min(p.replicas, budget)
            if p.parts:  # a split: kept whole, or planned afresh (fill splits it again)
                if self._split_stays(spec, p):
                    kept = replace(p, replicas=1, reason=p.reason or "already running here")
                    self.running.add(kept.key)
                    self._reserve(kept)
                    budget -= 1
                continue
            if self._settings_match(spec, node, p) and self._room(p, replicas):
                kept = replace(p, replicas=replicas, reason=p.reason or "already running here")
                self.running.add(kept.key)
            else:  # the model's settings changed, or the node shrank: re-fit in place
                fits = ((n, self._fit(spec, node, n)) for n in range(replicas, 0, -1))
                n, est = next(((n, f) for n, f in fits if not isinstance(f, str)), (0, None))
                if est is None:
                    continue
                kept = replace(self._placement(spec, node, n, est), reason="already running here")
            self._reserve(kept)
            budget -= kept.replicas

    def fill(self, spec: ModelSpec, target: int, *, partial: bool = False) -> bool:
        """Add replicas of ``spec`` until it has ``target``, one node choice at a time.

        Whether it has its min replicas now. If not, the replicas this call added
        are taken back (so that they do not crowd out models that can get all
        they need), unless ``partial`` or the model is pinned.
        """
        before = {k: p for k, p in self.placed.items() if p.model == spec.name}
        while self._count(spec.name) < target:
            if any(p.parts for p in self.placed.values() if p.model == spec.name):
                self.failures[spec.name] = "a split model runs one replica"
                enough = self._count(spec.name) >= spec.replicas.min
                if not (enough or partial or spec.pinned):
                    self._restore(spec.name, before)
                return enough
            choice = self._choose(spec)
            if isinstance(choice, str) and self._count(spec.name) == 0:
                choice = self._split(spec, choice)
            if isinstance(choice, str):
                self.failures[spec.name] = choice
                enough = self._count(spec.name) >= spec.replicas.min
                if not (enough or partial or spec.pinned):
                    self._restore(spec.name, before)
                return enough
            self._reserve(choice)
        return True

    def _choose(self, spec: ModelSpec) -> Placement | str:
        """Filter, fit, score, pick: the best placement for one more replica, or why none."""
        best: tuple | None = None
        refused: list[PlanNode] = []
        allowed = self._allowed(spec)
        for node in self.nodes.values():
            if node.name in allowed:
                held = self.placed.get((spec.name, node.name))
                count = held.replicas if held else 0
                if held is not None and held.key in self.running:
                    # running replicas keep their settings: one more is one more like them
                    fitted: Placement | MemoryEstimate | str = (
                        replace(held, replicas=count + 1) if self._room(held, count + 1) else ""
                    )
                else:
                    fitted = self._fit(spec, node, count + 1)
                if not isinstance(fitted, str):
                    score = self._score(spec, node, count, fitted)
                    if best is None or score < best[0]:
                        best = (score, node, fitted)
                    continue
            refused.append(node)
        if best is None:  # only now say why, node by node
            return self._explain(spec, refused)
        _, node, fitted = best
        if isinstance(fitted, Placement):
            return fitted
        held = self.placed.get((spec.name, node.name))
        return self._placement(spec, node, (held.replicas if held else 0) + 1, fitted)

    def _excluded(self, spec: ModelSpec, node: PlanNode) -> str | None:
        """Why ``node`` may not run ``spec`` at all (before any memory is counted)."""
        where = spec.placement
        if not node.up:
            return f"{node.name} is down"
        if where.nodes is not None and node.name not in where.nodes:
            return f"{node.name} is excluded by placement.nodes"
        for key, value in where.labels.items():
            if node.labels.get(key) != value:
                have = node.labels.get(key)
                return f"{node.name} has label {key}={have}, not {value}"
        if where.gpu == "required" and node.vram == 0:
            return f"{node.name} has no GPU (placement.gpu is required)"
        if node.ram == 0:
            return f"{node.name} offers no memory to Corral"
        return None

    def _fit(self, spec: ModelSpec, node: PlanNode, replicas: int) -> MemoryEstimate | str:
        """The memory of each of ``replicas`` replicas of ``spec`` on ``node`` (replicas on
        one node share one setting), or why they do not fit.

        They may use what is free there plus what this model's placement on the
        node already holds (it is re-fitted as a whole). Under ``gpu: auto`` each
        replica gets the most GPU layers that fit its share of the VRAM; the rest
        of the model stays in RAM.
        """
        info = self.models[spec.name]
        context = spec.context or self.default_context
        free_ram, free_vram = self.free_ram[node.name], self.free_vram[node.name]
        held = self.placed.get((spec.name, node.name))
        if held is not None:
            free_ram += held.replicas * held.ram
            free_vram += held.replicas * held.vram
        if spec.placement.gpu == "never" or node.vram == 0:
            est = self._estimate(spec, context, 0, 1)
        elif spec.placement.gpu == "required":
            est = self._estimate(spec, context, info.n_layers + 1, node.gpus)
        else:
            est = self._fit_layers(spec, context, free_vram // replicas, max(node.gpus, 1))
        for kind, free, need in (("VRAM", free_vram, est.vram), ("RAM", free_ram, est.ram)):
            if need * replicas <= free:
                continue
            if replicas > 1:  # the model has replicas - 1 here already (or keeps that many)
                return (
                    f"{node.name} has room for {replicas - 1}, not {replicas}: "
                    f"{human_bytes(free)} {kind} for them, {replicas} need "
                    f"{human_bytes(need * replicas)} ({_needs(est, info)})"
                )
            if kind == "VRAM":
                return (
                    f"{node.name} has {human_bytes(free)} VRAM free, "
                    f"needs {human_bytes(need)} for the whole model"
                )
            if est.gpu_layers == 0:
                return f"{node.name} has {human_bytes(free)} free"
            return f"{node.name} has {human_bytes(free)} free, needs {human_bytes(need)} with " + (
                _needs(est, info)
            )
        return est

    def _placement(
        self, spec: ModelSpec, node: PlanNode, replicas: int, est: MemoryEstimate
    ) -> Placement:
        info = self.models[spec.name]
        device = _device(est.gpu_layers, info.n_layers + 1)
        return Placement(
            model=spec.name,
            node=node.name,
            replicas=replicas,
            context=est.n_ctx,
            threads=spec.threads or self.default_threads or node.cores,
            gpu_layers=est.gpu_layers,
            ram=est.ram,
            vram=est.vram,
            path=info.path,
            reason=f"{spec.placement.strategy}: fits {node.name} with {device}",
            parallel=spec.slots,
            llama=spec.llama_settings(),
        )

    def _score(
        self, spec: ModelSpec, node: PlanNode, count: int, p: Placement | MemoryEstimate
    ) -> tuple:
        """Lower is better: spread away from (or pack onto) nodes with this model, then
        more of the model on a GPU, then the tightest fit. ``p`` is the model on
        ``node`` with one replica more than the ``count`` there now."""
        held = self.placed.get((spec.name, node.name))
        left = self.free_ram[node.name] + (held.replicas * held.ram if held else 0)
        left -= (count + 1) * p.ram
        gpu_share = p.gpu_layers / (self.models[spec.name].n_layers + 1)
        together = -count if spec.placement.strategy == "pack" else count
        return together, -gpu_share, left, node.name

    def _explain(self, spec: ModelSpec, refused: list[PlanNode]) -> str:
        info = self.models[spec.name]
        context = spec.context or self.default_context
        if spec.placement.gpu == "required":
            gpu = self._estimate(spec, context, info.n_layers + 1, 1)
            need = f"needs {human_bytes(gpu.vram)} VRAM ({_needs(gpu, info)})"
        else:
            cpu = self._estimate(spec, context, 0, 1)
            need = f"needs {human_bytes(cpu.ram)} RAM ({_needs(cpu, info)})"
        if not self.nodes:
            return f"{need}; the cluster has no nodes"
        reasons = []
        for node in refused:
            reason = self._excluded(spec, node)
            held = self.placed.get((spec.name, node.name))
            if reason is None and held is not None and held.key in self.running:
                has = f"{human_bytes(self.free_ram[node.name])} free"
                wants = f"{human_bytes(held.ram)} RAM"
                if held.vram:
                    has += f" and {human_bytes(self.free_vram[node.name])} VRAM free"
                    wants += f" + {human_bytes(held.vram)} VRAM"
                reason = f"{node.name} has {has}, needs {wants} for one more replica"
            elif reason is None:
                fitted = self._fit(spec, node, (held.replicas if held else 0) + 1)
                reason = fitted if isinstance(fitted, str) else f"{node.name} is full"
            reasons.append(reason)
        return f"{need}; " + "; ".join(reasons)

    # -- splitting a model over nodes ---------------------------------------------

    def _split(self, spec: ModelSpec, whole: str) -> Placement | str:
        """One replica of ``spec`` split over the fewest nodes that hold it together, or
        why none (``whole``: why no single node takes it).

        The main replica runs on the node with the most free RAM and keeps the input
        embeddings, the output layer (it computes the logits itself: a worker holding it
        would send a row of n_vocab floats per token instead of n_embd) and the host's
        compute buffer; each RPC worker, on the next nodes, holds a run of blocks with
        their KV cache, plus a compute buffer and its process. Blocks go to each node in
        proportion to the memory it has left after those fixed costs.

        GPU memory first: with ``gpu: auto``, each node with a GPU lends its VRAM (the
        main replica puts its own blocks on its GPUs), the others their RAM, and nodes
        are taken by the memory they lend, VRAM before RAM. When that does not hold the
        model, every node lends RAM, as on a cluster without GPUs. ``gpu: required``
        never splits.
        """
        where = spec.placement
        if where.split == "never" or where.gpu == "required":
            return whole
        info = self.models[spec.name]
        context = spec.context or self.default_context
        n = info.n_layers + 1  # llama.cpp's layers: the blocks and the output layer
        allowed = [self.nodes[name] for name in self._allowed(spec)]
        if len(allowed) < 2:
            return whole

        def last(g: int) -> int:
            """The bytes of the last ``g`` layers (weights and KV cache)."""
            est = self._estimate(spec, context, g, 1)
            return est.weights_vram + est.kv_vram

        layer = [last(n - i) - last(n - i - 1) for i in range(n)]  # layer i's bytes
        blocks, output = layer[:-1], layer[-1]
        partial = self._estimate(spec, context, n - 1, 1)
        cpu = self._estimate(spec, context, 0, 1)
        # the main replica holding no block: its input, the output layer and the host's
        # compute buffer as a whole model on the CPU has it (the logits are computed
        # here); no prompt cache (its KV cache lies on other boxes, nodes/llamacpp.py)
        costs = _SplitCosts(
            main=(partial.ram - layer[0] - partial.compute_ram + cpu.compute_ram + output)
            - partial.cache_ram,
            compute=partial.compute_vram,  # a device's compute buffer for its blocks
        )
        gpu_first = where.gpu != "never" and any(node.vram for node in allowed)
        tries = [True, False] if gpu_first else [False]
        for k in range(2, len(allowed) + 1):
            for gpus in tries:
                lenders = self._split_lenders(allowed, gpus)[:k]
                placed = self._split_over(spec, lenders, blocks, costs)
                if placed is not None:
                    return placed
        have = sum(max(0, self.free_ram[node.name]) for node in allowed)
        need = costs.main + sum(blocks) + (costs.compute + RPC_OVERHEAD) * (len(allowed) - 1)
        return (
            f"{whole}; split over the {len(allowed)} nodes it may use, it needs about "
            f"{human_bytes(need)} RAM and they have {human_bytes(have)} free "
            f"({human_bytes(max(0, need - have))} missing)"
        )

    def _split_lenders(self, nodes: Sequence[PlanNode], gpus: bool) -> list[_Lender]:
        """What each of ``nodes`` lends a split (its VRAM, if ``gpus`` and it has some;
        else its RAM), the most first, VRAM before RAM."""
        lent = [
            _Lender(node.name, True, self.free_vram[node.name])
            if gpus and node.vram
            else _Lender(node.name, False, self.free_ram[node.name])
            for node in nodes
        ]
        return sorted(lent, key=lambda d: (not d.vram, -d.free, d.node))

    def _split_over(
        self,
        spec: ModelSpec,
        lenders: Sequence[_Lender],
        blocks: Sequence[int],
        costs: _SplitCosts,
    ) -> Placement | None:
        """``spec`` split over ``lenders`` (the main replica on the one with the most free
        RAM), or None if they do not hold it."""
        main = min(lenders, key=lambda d: (-self.free_ram[d.node], d.node))
        workers = [d for d in lenders if d is not main]
        if main.vram and self.free_ram[main.node] < costs.main:
            return None
        if any(d.vram and self.free_ram[d.node] < RPC_OVERHEAD for d in workers):
            return None
        room = [self.free_vram[main.node] - costs.compute if main.vram else
                self.free_ram[main.node] - costs.main]  # fmt: skip
        room += [d.free - costs.compute - (0 if d.vram else RPC_OVERHEAD) for d in workers]
        if min(room) <= 0 or sum(room) < sum(blocks):
            return None
        # llama.cpp's order of blocks: this box's CPU, then the workers in order, then
        # this box's GPUs
        order = ([] if main.vram else [0]) + list(range(1, len(room))) + ([0] if main.vram else [])
        counts = _share_layers(blocks, [room[i] for i in order])
        if counts is None:
            return None
        held = dict(zip(order, counts, strict=True))
        if not all(held[i] for i in range(1, len(room))) or (main.vram and not held[0]):
            return None  # every worker, and the main replica's GPUs, hold a block
        bytes_of, first = {}, 0
        for i, count in zip(order, counts, strict=True):
            bytes_of[i], first = sum(blocks[first : first + count]), first + count
        parts = tuple(
            Part(d.node, held[i], RPC_OVERHEAD, bytes_of[i] + costs.compute)
            if d.vram
            else Part(d.node, held[i], bytes_of[i] + costs.compute + RPC_OVERHEAD)
            for i, d in enumerate(workers, start=1)
        )
        return self._split_placement(spec, main, held[0], bytes_of[0], parts, costs)

    def _split_placement(
        self,
        spec: ModelSpec,
        main: _Lender,
        count: int,
        size: int,
        parts: tuple[Part, ...],
        costs: _SplitCosts,
    ) -> Placement:
        """The main replica's placement: ``count`` blocks of ``size`` bytes (on its GPUs if
        it lends VRAM), the output layer, and its ``parts``."""
        info = self.models[spec.name]
        node = self.nodes[main.node]
        est = self._estimate(spec, spec.context or self.default_context, 0, 1)
        own = count + 1  # its blocks and the output layer
        split = " + ".join(
            [f"{main.node} {own}{' (VRAM)' if main.vram else ''}"]
            + [f"{p.node} {p.layers}{' (VRAM)' if p.vram else ''}" for p in parts]
        )
        return Placement(
            model=spec.name,
            node=main.node,
            replicas=1,
            context=est.n_ctx,
            threads=spec.threads or self.default_threads or node.cores,
            gpu_layers=count if main.vram else 0,
            ram=costs.main + (0 if main.vram else size),
            vram=size + costs.compute if main.vram else 0,
            path=info.path,
            reason=f"split: no node holds it whole; layers {split} (of {info.n_layers + 1})",
            parallel=spec.slots,
            llama=spec.llama_settings(),
            parts=parts,
            held=own,
        )

    # -- memory estimates ------------------------------------------------------

    def _estimate(
        self, spec: ModelSpec, context: int, gpu_layers: int, gpus: int
    ) -> MemoryEstimate:
        """The memory of one replica of ``spec`` as it will run: its slots and llama.cpp
        settings size the KV cache, compute and output buffers."""
        key = (spec.name, context, gpu_layers, gpus)
        est = self._estimates.get(key)
        if est is None:
            est = estimate_memory(
                self.models[spec.name],
                context,
                parallel=spec.slots,
                llama=spec.llama_settings(),
                gpu_layers=gpu_layers,
                gpus=gpus,
            )
            self._estimates[key] = est
        return est

    def _fit_layers(self, spec: ModelSpec, context: int, vram: int, gpus: int) -> MemoryEstimate:
        """``fit_gpu_layers`` on this plan's memo of estimates."""
        return fit_gpu_layers(
            self.models[spec.name],
            context,
            vram,
            gpus=gpus,
            estimate=lambda layers: self._estimate(spec, context, layers, gpus),
        )

    # -- bookkeeping ---------------------------------------------------------

    def priority(self, spec: ModelSpec) -> tuple:
        """Placing order: pinned models, then those that need a GPU (the others can fall
        back to RAM), then those fewer nodes may take, then the largest."""
        allowed = len(self._allowed(spec))
        size = self._estimate(spec, spec.context or self.default_context, 0, 1).ram
        return not spec.pinned, spec.placement.gpu != "required", allowed, -size, spec.name

    def _allowed(self, spec: ModelSpec) -> set[str]:
        """The nodes ``_excluded`` lets run ``spec``."""
        allowed = self._allowed_nodes.get(spec.name)
        if allowed is None:
            nodes = self.nodes.values()
            allowed = {n.name for n in nodes if self._excluded(spec, n) is None}
            self._allowed_nodes[spec.name] = allowed
        return allowed

    def _count(self, model: str) -> int:
        return sum(p.replicas for p in self.placed.values() if p.model == model)

    def _settings_match(self, spec: ModelSpec, node: PlanNode, p: Placement) -> bool:
        info = self.models[spec.name]
        threads = spec.threads or self.default_threads or node.cores
        gpu = spec.placement.gpu
        gpu_ok = (
            (gpu == "never" and p.gpu_layers == 0)
            or (gpu == "required" and p.gpu_layers == info.n_layers + 1)
            or (gpu == "auto" and (p.gpu_layers == 0 or node.vram > 0))
        )
        context = spec.context or self.default_context
        settings = (context, threads, info.path, spec.slots, spec.llama_settings())
        return gpu_ok and (p.context, p.threads, p.path, p.parallel, p.llama) == settings

    def _room(self, p: Placement, replicas: int) -> bool:
        """Whether ``p``'s node has room for ``replicas`` of it as they are (counting
        the replicas of it already placed there)."""
        held = self.placed.get(p.key)
        extra = replicas - (held.replicas if held else 0)
        return self.free_ram[p.node] >= extra * p.ram and self.free_vram[p.node] >= extra * p.vram

    def _split_stays(self, spec: ModelSpec, p: Placement) -> bool:
        """Whether a running split placement may stay as it is: every node of it up and
        allowed, the model's settings unchanged, and room for each part."""
        nodes = [self.nodes.get(name) for name in p.nodes]
        if any(n is None or self._excluded(spec, n) is not None for n in nodes):
            return False
        if spec.placement.split == "never" or not self._settings_match(spec, nodes[0], p):
            return False
        ram: dict[str, int] = {p.node: p.ram}
        vram: dict[str, int] = {p.node: p.vram}
        for part in p.parts:
            ram[part.node] = ram.get(part.node, 0) + part.ram
            vram[part.node] = vram.get(part.node, 0) + part.vram
        return all(self.free_ram[node] >= need for node, need in ram.items()) and all(
            self.free_vram[node] >= need for node, need in vram.items()
        )

    def _reserve(self, p: Placement) -> None:
        """Make ``p`` the placement of its model on its node, in place of any before."""
        self._release(p.key)
        self.placed[p.key] = p
        self.free_ram[p.node] -= p.replicas * p.ram
        self.free_vram[p.node] -= p.replicas * p.vram
        for part in p.parts:
            self.free_ram[part.node] -= part.ram
            self.free_vram[part.node] -= part.vram

    def _release(self, key: tuple[str, str]) -> None:
        held = self.placed.pop(key, None)
        if held is not None:
            self.free_ram[held.node] += held.replicas * held.ram
            self.free_vram[held.node] += held.replicas * held.vram
            for part in held.parts:
                self.free_ram[part.node] += part.ram
                self.free_vram[part.node] += part.vram

    def _restore(self, model: str, before: Mapping[tuple[str, str], Placement]) -> None:
        """Put ``model``'s placements back to ``before``."""
        for key in [k for k, p in self.placed.items() if p.model == model]:
            self._release(key)
        for p in before.values():
            self._reserve(p)

    def result(self, specs: Sequence[ModelSpec]) -> Plan:
        unplaced = []
        for spec in specs:
            placed = self._count(spec.name)
            wanted = spec.replicas.min
            if placed < wanted:
                reason = self.failures.get(spec.name, "no node could take it")
                unplaced.append(Unplaced(spec.name, wanted, placed, reason))
            info = self.models[spec.name]
            context = spec.context or self.default_context
            if context > info.n_ctx_train:
                self.notes.append(
                    f"{spec.name}: context {context} is above the {info.n_ctx_train} tokens "
                    f"the model was trained on; answers may degrade past that"
                )
            for name in spec.placement.nodes or ():
                if name not in self.nodes:
                    known = ", ".join(sorted(self.nodes)) or "none"
                    self.notes.append(
                        f"{spec.name}: placement.nodes names {name}, which is not in the "
                        f"cluster (nodes: {known})"
                    )
        placements = sorted(self.placed.values(), key=lambda p: (p.model, p.node))
        return Plan(tuple(placements), tuple(unplaced), tuple(self.notes))


@dataclass(frozen=True, slots=True)
class _Lender:
    """A node's memory offered to a split: its free VRAM (``vram``) or its free RAM."""

    node: str
    vram: bool
    free: int  # bytes


@dataclass(frozen=True, slots=True)
class _SplitCosts:
    """What a split costs beside its blocks: the main replica's fixed RAM (input, output
    layer, host compute buffer), and each device's compute buffer for its blocks."""

    main: int
    compute: int


def _share_layers(layer: Sequence[int], room: Sequence[int]) -> list[int] | None:
    """How many of ``layer`` (bytes each, in order) each node takes, in order (the main
    node first, then the workers): runs close to each node's share of ``room``, never
    more than its room, every worker at least one layer. If rounding to whole layers
    leaves the last node short, each node takes what fits instead. None if neither fits.
    """
    total, space = sum(layer), sum(room)
    for proportional in (True, False):
        counts, first, done = [], 0, 0  # done: the bytes of layers given so far
        for i, have in enumerate(room):
            goal = total * sum(room[: i + 1]) / space  # where this node's run should end
            used, end = 0, first
            while end < len(layer) and used + layer[end] <= have:
                if proportional and i < len(room) - 1 and done + used + layer[end] / 2 > goal:
                    break
                used += layer[end]
                end += 1
            counts.append(end - first)
            first, done = end, done + used
        if first == len(layer) and all(counts[1:]):
            return counts
    return None


def _needs(est: MemoryEstimate, info: GgufInfo) -> str:
    device = _device(est.gpu_layers, info.n_layers + 1)
    return f"context {est.n_ctx}, {f'on the {device}' if device in ('CPU', 'GPU') else device}"


def _device(gpu_layers: int, total: int | None = None) -> str:
    if gpu_layers == 0:
        return "CPU"
    if total is None:
        return f"{gpu_layers} GPU layers"
    return "GPU" if gpu_layers >= total else f"{gpu_layers}/{total} layers on GPU"


def human_bytes(n: int) -> str:
    if n >= GIB:
        return f"{n / GIB:.1f} GiB"
    return f"{n / MIB:.0f} MiB"
