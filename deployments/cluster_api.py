"""Corral's own routes about the cluster, under ``/api/cluster``."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter

from deployments.auth import visible
from deployments.backend import ModelBackend


def cluster_router(backend: ModelBackend) -> APIRouter:
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
        return {"placements": visible(placements, lambda p: str(p.get("model", "")))}

    return router
