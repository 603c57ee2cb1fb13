"""The ingress: one Serve deployment that serves Corral's HTTP API itself.

The ingress replica runs its own uvicorn server on the API address instead
of sitting behind Serve's HTTP proxy. Measured on a 2-core box, the proxy hop
costs about 12 ms before the first byte of every stream (16.4 ms vs 4.4 ms for
a bare streamed reply), most of the 20 ms budget Corral has for time to first
token. Serve still owns the ingress's life: it places it on the node the API
belongs to, health-checks it (``check_health`` fails if the server stopped),
and restarts it; the socket uses SO_REUSEPORT so a replacement can bind while
the old replica drains.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import uvicorn
from ray import serve
from ray.serve.deployment import Application

from deployments.actors import CONTROLLER_ACTOR, NAMESPACE
from deployments.api import DEFAULT_MAX_BODY, build_api
from deployments.auth import Keyring
from deployments.backend import ServeBackend
from deployments.routing import Strategy
from nodes.logs import setup_logging
from nodes.rayenv import node_api_key, serve_replica_on_loopback
from nodes.store import Store

log = logging.getLogger("corral.ingress")

INGRESS_APP = "corral"


@dataclass(frozen=True, slots=True)
class IngressConfig:
    host: str
    port: int
    version: str = "dev"
    log_level: str = "info"
    controller: str = CONTROLLER_ACTOR
    namespace: str = NAMESPACE
    routing: Strategy = "least_loaded"
    prefix_routing: bool = True  # a conversation goes back where its cache is
    load_timeout: float = 600.0  # seconds a request waits for its model to load
    models: str = ""  # the model store's root on this box (the head): blobs up and down
    keys: str = ""  # the API key file (deployments/keys.py); "" : no keys
    auth_required: bool = False  # a key even before any exists
    max_body: int = DEFAULT_MAX_BODY  # bytes of a request body, model uploads excepted


class _EmbeddedServer(uvicorn.Server):
    """uvicorn without its signal handlers: the Ray worker owns the process's signals."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


def listen_socket(host: str, port: int) -> socket.socket:
    """A listening TCP socket that a replacement ingress may share while this one drains."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, port))
    sock.listen(2048)
    sock.setblocking(False)
    return sock


class Ingress:
    """Serve deployment running the HTTP API (``build_api``) on its own socket."""

    async def __init__(self, config: IngressConfig) -> None:
        setup_logging(config.log_level)
        serve_replica_on_loopback()
        backend = ServeBackend(
            config.controller,
            config.namespace,
            routing=config.routing,
            prefix_routing=config.prefix_routing,
            load_timeout=config.load_timeout,
            store=Store(config.models) if config.models else None,
        )
        keyring = Keyring(
            Path(config.keys) if config.keys else None,
            required=config.auth_required,
            node_key=node_api_key(),
        )
        app = build_api(backend, version=config.version, keyring=keyring, max_body=config.max_body)
        self._server = _EmbeddedServer(
            uvicorn.Config(
                app,
                lifespan="off",
                log_level="warning",
                timeout_keep_alive=30,
                # Bodies are parsed by FastAPI; h11/httptools limits stay uvicorn's.
            )
        )
        self._socket = listen_socket(config.host, config.port)
        self._task = asyncio.create_task(self._server.serve(sockets=[self._socket]))
        while not self._server.started:
            if self._task.done():
                self._task.result()  # raises the startup error
                raise RuntimeError("the HTTP server stopped during startup")
            await asyncio.sleep(0.01)
        log.info("serving the API on %s:%d", config.host, config.port)

    async def check_health(self) -> None:
        """Serve calls this periodically; raising makes it replace the replica."""
        if self._task.done():
            raise RuntimeError(f"the API server stopped: {self._task.exception()!r}")

    def __del__(self) -> None:
        # Serve calls this when it stops the replica: stop accepting, let uvicorn
        # close its connections on its next tick.
        if server := getattr(self, "_server", None):
            server.should_exit = True


def ingress_app(config: IngressConfig, *, node_labels: dict[str, str] | None = None) -> Application:
    """The ingress application; ``node_labels`` pins it to the node that owns the API address."""
    options: dict = {"num_cpus": 0}
    if node_labels:
        options["label_selector"] = node_labels
    deployment = serve.deployment(
        Ingress,
        name="Ingress",
        num_replicas=1,
        max_ongoing_requests=1,  # Serve sends it no requests; HTTP arrives on its own socket
        ray_actor_options=options,
        health_check_period_s=2,
    )
    return deployment.bind(config)
