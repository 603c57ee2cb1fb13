"""Corral's own routes about the cluster, under ``/api/cluster``: what the CLI and
the dashboard read (nodes, placements, events, the live stream) and the models
file they plan and apply."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Query
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, Field

from deployments.auth import current_grant, visible
from deployments.backend import ModelBackend
from deployments.dashboard.feed import Feed
from deployments.views import PlanView


class ModelsFileBody(BaseModel):
    models_yaml: str = Field(description="a models file, as configs/models.yaml describes")


def cluster_router(backend: ModelBackend, feed: Feed) -> APIRouter:
    router = APIRouter(prefix="/api/cluster", tags=["Cluster"])

    @router.get("/nodes")
    async def nodes() -> dict[str, Any]:
        """Every node: role, state, hardware, live RAM/VRAM use, offered capacity, models."""
        return {"nodes": await backend.cluster_nodes()}

    @router.get("/placements")
    async def placements() -> dict[str, Any]:
        """Every placement (a model on a node): replicas, context, threads, GPU layers, the
        RAM and VRAM each replica holds, why it is there, and its Serve status."""
        placements = await backend.cluster_placements()
        return {"placements": visible(placements, lambda p: p.model)}

    @router.get("/events")
    async def events(
        since: float = Query(0.0, description="only events from this time on (epoch seconds)"),
    ) -> dict[str, Any]:
        """The controller's recent events, oldest first: loads, evictions, unloads, scaling,
        nodes lost, re-placements and failures, each with its reason."""
        return {"events": await backend.cluster_events(since)}

    @router.get("/stream")
    async def stream(
        limit: int | None = Query(None, ge=1, description="end after this many snapshots"),
    ) -> StreamingResponse:
        """Server-Sent Events: a ``snapshot`` of nodes, placements, new events and the
        charts' activity every 2 s (what the dashboard shows), as the key may see them."""
        return StreamingResponse(
            feed.stream(current_grant(), limit),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )

    @router.get("/whoami")
    async def whoami() -> dict[str, Any]:
        """The request's key (never the key itself): its name and models, and whether it
        may change the cluster (plan, apply, pull, delete, copy, load and unload)."""
        grant = current_grant()
        key = None
        if grant is not None:
            models = sorted(grant.models) if grant.models is not None else None
            key = {"name": grant.name, "limited": grant.limited, "models": models}
        return {"auth": grant is not None, "key": key, "can_change": not key or not key["limited"]}

    @router.get("/models-file")
    async def models_file() -> dict[str, Any]:
        """The applied models file as YAML (what `corral apply` or the dashboard applied)."""
        return {"text": await backend.models_file()}

    @router.post("/plan")
    async def plan(body: ModelsFileBody) -> PlanView:
        """What applying this models file would change, as `corral plan` says it."""
        return await backend.plan_models(body.models_yaml)

    @router.post("/apply")
    async def apply(body: ModelsFileBody) -> PlanView:
        """Make the cluster run what this models file declares; the report says what
        changed and what failed."""
        return await backend.plan_models(body.models_yaml, apply=True)

    return router
