"""Records of ``deployments/views.py`` for tests, with what a test does not care about
filled in."""

from __future__ import annotations

from typing import Any

from deployments.views import PlacementView

PLACEMENT_DEFAULTS: dict[str, Any] = {
    "app": "model-app",
    "status": "RUNNING",
    "replicas": 1,
    "in_flight": 0,
    "slots": 1,
    "idle_for": None,
    "keep_alive": None,
    "expires_at": None,
    "held": False,
    "pinned": False,
    "min": 0,
    "max": 1,
    "declared": False,
    "context": 2048,
    "threads": 2,
    "gpu_layers": 0,
    "ram": 0,
    "vram": 0,
    "path": None,
    "reason": "",
}


def placement_view(model: str, node: str, **fields: Any) -> PlacementView:
    """A placement row of ``model`` on ``node``, as the controller sends it."""
    return PlacementView.model_validate(
        {**PLACEMENT_DEFAULTS, "model": model, "node": node, **fields}
    )
