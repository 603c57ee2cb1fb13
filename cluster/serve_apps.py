"""Ray Serve as the controller drives it: each placement's application, deployed, scaled,
deleted and read back.

The controller talks to Serve only through a ``ServeApps``: ``RayServeApps`` is the
real one, and the only module of Corral that reaches into Serve's private API
(``serve._run`` with the external scaler enabled, and the Serve controller's
``update_deployment_replicas``), so that a Ray upgrade that moves them breaks one
file. Every method is async: Serve's client calls block, and the controller's
event loop answers every request's ``ensure``.

Naming lives here too: a placement's application name is derived from its model
and node (``app_name_for``), and a new controller adopts what runs by those names
(``adoptable``).
"""

from __future__ import annotations

import asyncio
import hashlib
import math
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import ray
from ray import serve
from ray.serve._private.common import DeploymentID
from ray.serve.context import _get_global_client
from ray.serve.deployment import Application

from cluster.planner import Placement
from deployments.replica import REPLICA_DEPLOYMENT
from nodes.agent import LABEL_NODE, VRAM_RESOURCE

APP_PREFIX = "model-"  # every placement's Serve application, and only those, start so
MIB = 1024**2
# Ray sets CUDA_VISIBLE_DEVICES="" for actors that ask for no GPU; a placement
# with GPU layers must see its node's GPUs (VRAM is counted by ``vram_mib``).
SEE_ALL_GPUS = {"RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES": "1"}
# Serve application states whose replicas may still hold a loaded model.
ADOPTABLE = ("RUNNING", "DEPLOYING", "UNHEALTHY")


def app_name_for(model: str, node: str) -> str:
    """The Serve application of ``model`` on ``node``: readable, unique, safe in URLs and logs."""
    slug = re.sub(r"[^a-z0-9]+", "-", f"{model}-{node}".lower()).strip("-")
    digest = hashlib.sha256(f"{model}@{node}".encode()).hexdigest()[:6]
    return f"{APP_PREFIX}{slug}-{digest}"


def actor_options(p: Placement) -> dict:
    """Ray options of each replica of ``p``: pinned to its node, holding its memory."""
    options: dict = {"label_selector": {LABEL_NODE: p.node}, "memory": p.ram}
    if p.vram:
        options["resources"] = {VRAM_RESOURCE: math.ceil(p.vram / MIB)}
        options["runtime_env"] = {"env_vars": dict(SEE_ALL_GPUS)}
    return options


def adoptable(
    saved: Sequence[Placement], apps: dict[str, str]
) -> tuple[list[Placement], list[str]]:
    """Which saved placements a new controller takes over, and which placement apps running
    in Serve nobody knows (a controller stopped between deploying and saving).

    ``apps`` maps each Serve application to its status.
    """
    adopted = [p for p in saved if apps.get(app_name_for(*p.key)) in ADOPTABLE]
    known = {app_name_for(*p.key) for p in adopted}
    orphans = sorted(a for a in apps if a.startswith(APP_PREFIX) and a not in known)
    return adopted, orphans


@dataclass(frozen=True, slots=True)
class AppState:
    """What Serve says of one application."""

    status: str  # Serve's ApplicationStatus: RUNNING, DEPLOYING, DEPLOY_FAILED, UNHEALTHY, ...
    running: int  # replicas of its deployment that run now
    message: str  # the most telling message: a deployment's, else the application's


class ServeApps(Protocol):
    """What the controller needs of Serve (a fake in tests, ``RayServeApps`` for real)."""

    async def deploy(self, name: str, app: Application) -> None:
        """Deploy ``app`` as ``name`` without waiting; its replica count is then ours to set."""
        ...

    async def scale(self, name: str, replicas: int) -> None:
        """Set ``name``'s replica count in place: the running replicas keep running."""
        ...

    async def delete(self, names: Sequence[str], *, drain: bool = True) -> None:
        """Delete the applications ``names``; ``drain``: wait for their replicas to stop
        (False when they are gone already, with their node or in a crash loop)."""
        ...

    async def states(self) -> dict[str, AppState]:
        """Every application Serve runs, by name."""
        ...


class RayServeApps:
    """``ServeApps`` on the Serve instance of the Ray cluster this process is connected to."""

    async def deploy(self, name: str, app: Application) -> None:
        await asyncio.to_thread(
            serve._run,
            app,
            name=name,
            route_prefix=None,
            _blocking=False,
            # The controller owns replica counts. Deploying again would restart every
            # replica (each deploy from code is a new version); the external scaler adds
            # or removes replicas and leaves the others running.
            external_scaler_enabled=True,
        )

    async def scale(self, name: str, replicas: int) -> None:
        await asyncio.to_thread(_set_replicas, name, replicas)

    async def delete(self, names: Sequence[str], *, drain: bool = True) -> None:
        await asyncio.gather(*(asyncio.to_thread(serve.delete, n, drain) for n in names))

    async def states(self) -> dict[str, AppState]:
        status = await asyncio.to_thread(serve.status)
        return {name: _state_of(app) for name, app in status.applications.items()}


def _set_replicas(app_name: str, replicas: int) -> None:
    controller = _get_global_client()._controller
    ray.get(
        controller.update_deployment_replicas.remote(
            DeploymentID(name=REPLICA_DEPLOYMENT, app_name=app_name), replicas
        )
    )


def _state_of(app) -> AppState:
    running = sum(d.replica_states.get("RUNNING", 0) for d in app.deployments.values())
    message = next((d.message for d in app.deployments.values() if d.message), "")
    return AppState(
        status=str(getattr(app.status, "value", app.status)),
        running=running,
        message=message or app.message or "",
    )


@dataclass(frozen=True, slots=True)
class Loading:
    """A placement deployed and not yet known to run."""

    app: str
    node: str
    replicas: int
    label: str  # "model on node", what failures are keyed by


async def wait_running(
    apps: ServeApps,
    loading: Sequence[Loading],
    timeout: float,
    *,
    alive: Callable[[], set[str]],
    crashed: Callable[[str, str, int], str | None],
) -> dict[str, str]:
    """Wait until each of ``loading`` runs all its replicas, or fails; returns why each
    failed, by label. ``alive``: the names of the nodes up now (empty: unknown);
    ``crashed(app, node, at_least)``: why the app's processes count as crash-looping
    with ``at_least`` recent deaths (0: the crash limit), else None."""
    waiting = {w.app: w for w in loading}
    deadline = time.monotonic() + timeout
    failed: dict[str, str] = {}
    while waiting:
        states, up = await apps.states(), alive()
        for app, w in list(waiting.items()):
            state = states.get(app)
            if up and w.node not in up:  # its replicas can never start
                failed[w.label] = f"{w.node} left the cluster while it loaded"
            elif state is None:
                continue
            elif state.status == "RUNNING" and state.running == w.replicas:
                pass
            elif state.status in ("DEPLOY_FAILED", "UNHEALTHY"):
                # a crash: "ActorDiedError()", unless its crash notes say more
                failed[w.label] = crashed(app, w.node, 1) or last_line(state.message)
            elif (why := crashed(app, w.node, 0)) is not None:
                failed[w.label] = why  # Serve would try it again and again
            else:
                continue
            del waiting[app]
        if waiting and time.monotonic() > deadline:
            for app, w in waiting.items():
                state = states.get(app)
                why = f": {last_line(state.message)}" if state and state.message else ""
                failed[w.label] = f"not running after {timeout:.0f}s{why}"
            break
        if waiting:
            await asyncio.sleep(0.05)
    return failed


def last_line(text: object) -> str:
    """The informative end of an error that may carry a remote traceback."""
    lines = [line.strip() for line in str(text).splitlines() if line.strip()]
    return lines[-1] if lines else "unknown error"
