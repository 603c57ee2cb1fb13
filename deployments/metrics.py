"""Prometheus metrics at ``/metrics`` (SKELETON: the metrics helper fills this in).

Interface used by ``deployments/api.py`` (keep these names and signatures):

* ``ApiMetrics()``: the ingress's own metrics, in a private ``CollectorRegistry``.
* ``RequestMetrics(app, metrics=...)``: ASGI middleware counting requests by
  route, model and status.
* ``metrics_router(backend, metrics)``: the ``GET /metrics`` route.
* ``ApiMetrics.use_routes(app.routes)``: called once the routes are in.
"""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from starlette.types import ASGIApp, Receive, Scope, Send

from deployments.backend import ModelBackend
from deployments.middleware import HttpMiddleware


class ApiMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.routes: list = []

    def use_routes(self, routes: list) -> None:
        """The app's routes, to label requests that never reached one (401, 404)."""
        self.routes = list(routes)


class RequestMetrics(HttpMiddleware):
    def __init__(self, app: ASGIApp, metrics: ApiMetrics) -> None:
        super().__init__(app)
        self.metrics = metrics

    async def handle(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self.app(scope, receive, send)


def metrics_router(backend: ModelBackend, metrics: ApiMetrics) -> APIRouter:
    router = APIRouter(tags=["Metrics"])

    @router.get("/metrics")
    async def scrape() -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    return router
