"""Helpers for tests that drive the session's Corral on the simulated homelab: the
controller's events, the placements the API shows, applying a models file, waiting."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import httpx
import psutil
import ray
from ray import serve

from cluster.plan_report import PlanReport
from cluster.serve_apps import app_name_for
from cluster.spec import load_models
from deployments.actors import CONTROLLER_ACTOR, NAMESPACE
from deployments.replica import REPLICA_DEPLOYMENT, ReplicaInfo, ReplicaStats
from deployments.views import Event

T = TypeVar("T")


def controller():
    return ray.get_actor(CONTROLLER_ACTOR, namespace=NAMESPACE)


def wait_for(predicate: Callable[[], T], timeout: float, what: str) -> T:
    """Poll ``predicate`` until it returns something truthy; fail after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(0.1)


def events(since: float, model: str | None = None, kind: str | None = None) -> list[dict]:
    """The controller's events since ``since`` (wall clock), for ``model`` and ``kind``, as
    the JSON of ``/api/cluster/events`` (what a client sees)."""
    found: list[Event] = ray.get(controller().events.remote(since), timeout=30)
    return [
        e.model_dump(mode="json")
        for e in found
        if (model is None or e.model == model) and (kind is None or e.kind == kind)
    ]


def placement_rows(url: str) -> list[dict]:
    """Every row of ``GET /api/cluster/placements``."""
    r = httpx.get(f"{url}/api/cluster/placements", timeout=30)
    assert r.status_code == 200, r.text
    return r.json()["placements"]


def placements(corral, model: str | None = None) -> dict[str, dict]:
    """The rows of ``/api/cluster/placements`` (of ``model``), by node."""
    rows = placement_rows(corral.url)
    return {p["node"]: p for p in rows if model is None or p["model"] == model}


def replica_handle(model: str, node: str):
    return serve.get_deployment_handle(REPLICA_DEPLOYMENT, app_name_for(model, node))


def replica_stats(model: str, node: str) -> ReplicaStats:
    return replica_handle(model, node).stats.remote().result(timeout_s=30)


def replica_info(model: str, node: str) -> ReplicaInfo:
    return replica_handle(model, node).info.remote().result(timeout_s=30)


def replica_pids(model: str, node: str) -> frozenset[int]:
    """The processes of every replica of ``model`` on ``node`` (Ray titles each process with
    its actor's name; every simulated node runs on this machine)."""
    title = f"ray::ServeReplica:{app_name_for(model, node)}:"
    return frozenset(
        p.info["pid"]
        for p in psutil.process_iter(["cmdline", "pid"])
        if (p.info["cmdline"] or [""])[0].startswith(title)
    )


def apply_models(text: str, path: Path, starter_path: Path) -> PlanReport:
    """Write a models file (``{starter}`` stands for the starter GGUF's path) and apply it as
    ``corral apply`` does; fails if a placement failed or a model got fewer than it needs."""
    path.write_text(text.replace("{starter}", str(starter_path)))
    report = ray.get(controller().apply.remote(load_models(path)), timeout=300)
    assert report.failed == {}, report.failed
    assert not [u for u in report.plan.unplaced if u.placed < u.wanted], report.plan.unplaced
    return report


def fake_model(name: str, **fields: str) -> str:
    """A models.yaml entry for ``name`` on the fake engine (context 512 unless ``fields``
    say otherwise); ``fields`` are more keys, each value one line of YAML."""
    fields = {"context": "512", **fields}
    lines = [f"  - name: {name}", "    source: {starter}", "    engine: fake", "    threads: 1"]
    for key, value in fields.items():
        lines.append(f"    {key}: {value}")
    return "\n".join(lines) + "\n"


def models_file(*entries: str) -> str:
    return "models:\n" + "".join(entries)
