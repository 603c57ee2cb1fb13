"""Start and stop a Corral server: Ray, Serve, the controller and the ingress.

``corral serve`` and the integration tests both go through ``start_corral``,
so the tests exercise exactly what users run.
"""

from __future__ import annotations

import os
import socket
import time
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, version

import httpx
import ray
from ray import serve

from cluster.auth import enable_ray_token_auth
from cluster.controller import start_controller
from cluster.settings import CorralSettings
from deployments.backend import CONTROLLER_ACTOR, NAMESPACE
from deployments.ingress import INGRESS_APP, IngressConfig, ingress_app


class StartupError(Exception):
    """Corral could not start; the message says what to fix."""


def corral_version() -> str:
    try:
        return version("corral")
    except PackageNotFoundError:
        return "dev"


@dataclass
class RunningCorral:
    """A started server; ``stop()`` takes down what ``start_corral`` brought up."""

    settings: CorralSettings
    url: str
    owns_ray: bool
    stopped: bool = field(default=False, init=False)

    def stop(self) -> None:
        if self.stopped:
            return
        self.stopped = True
        try:
            serve.shutdown()
        finally:
            try:
                ray.kill(ray.get_actor(CONTROLLER_ACTOR, namespace=NAMESPACE))
            except ValueError:
                pass
            if self.owns_ray:
                ray.shutdown()


def check_port_free(host: str, port: int) -> None:
    """Fail early, with the fix, if something already listens where the API should."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as exc:
            raise StartupError(
                f"Cannot listen on {host}:{port}: {exc.strerror}. Another server (Ollama?) may "
                f"be using it; stop it or choose another address with --host or CORRAL_HOST."
            ) from None


def start_corral(settings: CorralSettings) -> RunningCorral:
    """Bring Corral up as ``settings`` say and return once the API answers."""
    host, port = settings.listen
    check_port_free(host, port)
    owns_ray = not ray.is_initialized()
    if owns_ray:
        enable_ray_token_auth(settings.state_path)
        _init_ray(settings)
    running = RunningCorral(settings, url=f"http://{_url_host(host)}:{port}", owns_ray=owns_ray)
    try:
        # No Serve HTTP proxy: the ingress serves the API itself (deployments/ingress.py).
        serve.start(proxy_location="Disabled")
        start_controller(settings)
        config = IngressConfig(
            host=host, port=port, version=corral_version(), log_level=settings.log_level
        )
        serve.run(
            ingress_app(config, node_labels=_this_node()), name=INGRESS_APP, route_prefix=None
        )
        _wait_until_answering(running.url, timeout=60)
    except BaseException:
        running.stop()
        raise
    return running


# Serve tuning for a small box, applied to the Ray processes a private cluster starts
# (they inherit this process's environment). Run replica code and the handle router
# on the replica's own event loop instead of hopping between threads: Corral's
# replicas never block their loop (engine work runs in executors), which is what
# these options require.
SERVE_ENV = {
    "RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD": "0",
    "RAY_SERVE_RUN_ROUTER_IN_SEPARATE_LOOP": "0",
    # Serve's controller wakes 10 times a second by default; twice is plenty for a
    # homelab and gives the model back ~2% of a core (3x less controller CPU).
    "RAY_SERVE_CONTROL_LOOP_INTERVAL_S": "0.5",
}


def _init_ray(settings: CorralSettings) -> None:
    for key, value in SERVE_ENV.items():
        os.environ.setdefault(key, value)  # inherited by the Ray processes we start
    if settings.ray_address:
        ray.init(address=settings.ray_address, namespace=NAMESPACE, logging_level="warning")
        return
    ray.init(
        namespace=NAMESPACE,
        include_dashboard=settings.dashboard,
        dashboard_host="127.0.0.1",
        labels={"corral.node": socket.gethostname(), "corral.role": "head"},
        logging_level="warning",
    )


def _this_node() -> dict[str, str] | None:
    """A label selector for the node this process runs on: the API binds here."""
    name = ray.get_runtime_context().get_node_labels().get("corral.node")
    return {"corral.node": name} if name else None


def _url_host(host: str) -> str:
    if host in ("0.0.0.0", "::", ""):
        return "127.0.0.1"
    return f"[{host}]" if ":" in host else host


def _wait_until_answering(url: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            if httpx.get(url + "/", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            raise StartupError(f"Corral started but {url} does not answer after {timeout:.0f}s.")
        time.sleep(0.2)
