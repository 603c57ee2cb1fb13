"""The RPC workers of split placements: one Ray actor per node that lends a placement
layers (``nodes.rpc.RpcLender``), started before the placement's replica and stopped
once the placement is gone.

A lender is a detached actor named after its placement's Serve application and its
node, so it outlives a restarted controller (which adopts the placement and with it its
lenders) and anything can find it by name. It holds the memory of its layers as
Ray's ``memory`` resource on its node (and, lending its GPUs, their VRAM as
``vram_mib``), so Ray's accounting and the planner's agree.

``sweep`` removes the lenders no placement needs (whichever way a placement went:
unloaded, evicted, re-planned, lost); ``running`` lists those alive, from which the
controller finds a split placement that lost one and re-plans it as for a lost node.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Collection, Iterable

import ray

from cluster.planner import MIB, Part, Placement
from cluster.serve_apps import SEE_ALL_GPUS
from nodes.agent import LABEL_NODE, VRAM_RESOURCE
from nodes.engine import RpcPart
from nodes.errors import ModelLoadFailed
from nodes.rpc import START_TIMEOUT, RpcLender

log = logging.getLogger("corral.lenders")

PREFIX = "corral-rpc:"  # every lender's actor name, and only theirs, starts so


def name_of(app: str, node: str) -> str:
    return f"{PREFIX}{app}@{node}"


async def lend(p: Placement, app: str, ports: tuple[int, int]) -> tuple[RpcPart, ...]:
    """Start (or restart) a lender on each node of ``p.parts``; their endpoints, in order.

    Raises ``ModelLoadFailed`` naming the node whose worker did not start."""
    started = await asyncio.gather(
        *(_start(part, app, ports, p.threads) for part in p.parts), return_exceptions=True
    )
    failed = [
        (part, exc)
        for part, exc in zip(p.parts, started, strict=True)
        if isinstance(exc, BaseException)
    ]
    if failed:
        await stop(name_of(app, part.node) for part in p.parts)
        part, exc = failed[0]
        raise ModelLoadFailed(
            f"the RPC worker for {part.layers} layers of {p.model} on {part.node} did not "
            f"start: {_reason(exc)}"
        )
    return tuple(started)  # type: ignore[arg-type]


async def _start(part: Part, app: str, ports: tuple[int, int], threads: int) -> RpcPart:
    name = name_of(app, part.node)
    await stop([name])  # a reload: a new worker, sized for the new part
    options: dict = {}
    if part.vram:  # it lends its GPUs: it holds their VRAM, and must see them
        options["resources"] = {VRAM_RESOURCE: math.ceil(part.vram / MIB)}
        options["runtime_env"] = {"env_vars": dict(SEE_ALL_GPUS)}
    actor = (
        ray.remote(RpcLender)
        .options(
            name=name,
            lifetime="detached",
            label_selector={LABEL_NODE: part.node},
            num_cpus=0,
            memory=part.ram,
            max_restarts=0,
            **options,
        )
        .remote("", ports, "", threads, bool(part.vram))
    )
    endpoint = await asyncio.wait_for(actor.endpoint.remote(), START_TIMEOUT + 30)
    log.info("RPC worker %s on %s listens at %s", name, part.node, endpoint)
    return RpcPart(node=part.node, endpoint=endpoint, layers=part.layers)


def _reason(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError):
        return "it did not answer in time (does the node have the memory Ray was asked for?)"
    cause = getattr(exc, "cause", None)  # a RayTaskError carries the actor's exception
    return str(cause or exc).strip().splitlines()[-1]


async def stop(names: Iterable[str]) -> None:
    for name in list(names):
        try:
            actor = await asyncio.to_thread(ray.get_actor, name)
        except ValueError:  # not there
            continue
        await asyncio.to_thread(ray.kill, actor, no_restart=True)


async def running() -> set[str]:
    """The names of the lenders alive now."""
    names = await asyncio.to_thread(ray.util.list_named_actors)
    return {n for n in names if n.startswith(PREFIX)}


async def sweep(needed: Collection[str], starting: Collection[str] = ()) -> list[str]:
    """Stop every lender not in ``needed`` nor of an application in ``starting`` (its
    placement is being deployed); their names."""
    extra = sorted(
        name for name in await running() if name not in needed and app_of(name) not in starting
    )
    if extra:
        log.info("stopping RPC workers no placement needs: %s", ", ".join(extra))
        await stop(extra)
    return extra


def app_of(name: str) -> str:
    """The Serve application a lender's name names."""
    return name.removeprefix(PREFIX).rpartition("@")[0]


def needed_by(p: Placement, app: str) -> list[str]:
    return [name_of(app, part.node) for part in p.parts]
