"""Corral's own routes about the cluster, under ``/api/cluster``."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter

from deployments.backend import ModelBackend


def cluster_router(backend: ModelBackend) -> APIRouter:
    router = APIRouter(prefix="/api/cluster", tags=["Cluster"])

    @router.get("/nodes")
    async def nodes() -> dict[str, Any]:
        """Every node: role, state, hardware, live RAM/VRAM use, offered capacity, models."""
        return {"nodes": await backend.cluster_nodes()}

    return router
