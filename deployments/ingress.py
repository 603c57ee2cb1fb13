"""The Serve ingress: the one HTTP endpoint of a Corral cluster."""

from __future__ import annotations

from fastapi import FastAPI
from ray import serve
from ray.serve.deployment import Application

from deployments.api import build_api
from deployments.backend import CONTROLLER_ACTOR, NAMESPACE, ServeBackend

INGRESS_APP = "corral"


@serve.ingress()
class Ingress:
    """Serves ``build_api`` over a ``ServeBackend`` (controller + replica handles)."""

    def __init__(self, controller: str, namespace: str, version: str) -> None:
        self._backend = ServeBackend(controller, namespace)
        self._version = version

    def __serve_build_asgi_app__(self) -> FastAPI:
        return build_api(self._backend, version=self._version)


def ingress_app(
    *, controller: str = CONTROLLER_ACTOR, namespace: str = NAMESPACE, version: str = "dev"
) -> Application:
    """The ingress application, ready for ``serve.run(..., route_prefix="/")``."""
    deployment = serve.deployment(
        Ingress,
        name="Ingress",
        # The ingress mostly waits on replicas; it must never be the bottleneck.
        max_ongoing_requests=1024,
        ray_actor_options={"num_cpus": 0},
    )
    return deployment.bind(controller, namespace, version)
