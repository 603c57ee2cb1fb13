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

from cluster.head_actors import start_head_actors
from cluster.settings import CorralSettings
from deployments.actors import CONTROLLER_ACTOR, LIBRARY_ACTOR, NAMESPACE
from deployments.ingress import INGRESS_APP, IngressConfig, ingress_app
from deployments.keys import keys_path
from nodes import cpu_kernels
from nodes.agent import LABEL_CPU_KERNELS, LABEL_NODE, LABEL_ROLE, NodeRecord
from nodes.rayenv import (
    SYSTEM_CONFIG,
    ensure_token,
    loopback_only,
    token_path,
    use_in_this_process,
)


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

    @property
    def address(self) -> str:
        """The Ray cluster's address (GCS HOST:PORT)."""
        return ray.get_runtime_context().gcs_address

    def stop(self) -> None:
        """Stop the API and the controller. On a cluster of its own, everything goes with
        Ray. On a cluster it joined, the models keep running: the next ``corral serve``
        adopts them instead of loading each again (a restart for an upgrade or a settings
        change costs no model loads); ``corral node stop`` on the head ends them."""
        if self.stopped:
            return
        self.stopped = True
        try:
            if self.owns_ray:
                serve.shutdown()
            else:
                serve.delete(INGRESS_APP)
        finally:
            for actor in (CONTROLLER_ACTOR, LIBRARY_ACTOR):
                try:
                    ray.kill(ray.get_actor(actor, namespace=NAMESPACE), no_restart=True)
                except ValueError:
                    pass
            if self.owns_ray:
                NodeRecord.remove(self.settings.state_path)
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
    owns_ray = False
    if not ray.is_initialized():
        owns_ray = _init_ray(settings)
    running = RunningCorral(settings, url=f"http://{_url_host(host)}:{port}", owns_ray=owns_ray)
    try:
        # No Serve HTTP proxy: the ingress serves the API itself (deployments/ingress.py).
        serve.start(proxy_location="Disabled")
        here = _this_node()
        start_head_actors(settings, here)
        config = IngressConfig(
            host=host,
            port=port,
            version=corral_version(),
            log_level=settings.log_level,
            routing=settings.routing,
            prefix_routing=settings.prefix_routing,
            load_timeout=settings.load_timeout,
            models=str(settings.models_path),
            keys=str(keys_path(settings.state_path)),
            auth_required=settings.auth.required,
            max_body=settings.max_body,
        )
        serve.run(ingress_app(config, node_labels=here), name=INGRESS_APP, route_prefix=None)
        _wait_until_answering(running.url, timeout=60)
    except BaseException:
        running.stop()
        raise
    return running


def cluster_address(settings: CorralSettings) -> str | None:
    """The cluster to use: the configured address, else the one this box's node (or a
    running ``corral serve``) belongs to, else None."""
    if settings.ray_address:
        return settings.ray_address
    record = NodeRecord.read(settings.state_path)
    return record.address if record else None


def join_cluster(address: str, settings: CorralSettings, *, quiet: bool = False) -> None:
    """Connect this process to the cluster at ``address`` as a Ray driver.

    ``quiet`` keeps the Ray processes' output away from this terminal (for one-shot
    commands such as ``corral nodes``)."""
    token = token_path(settings.state_path)
    if not token.is_file() and not os.environ.get("RAY_AUTH_TOKEN"):
        raise StartupError(f"no cluster token at {token}: copy the head's token file there")
    use_in_this_process(token)
    # the cluster of a corral serve alone on this box listens on loopback: join it there
    record = NodeRecord.read(settings.state_path)
    alone = record is not None and record.kind == "serve" and record.address == address
    node_ip = loopback_only() if alone else None
    try:
        ray.init(
            address=address,
            _node_ip_address=node_ip,
            namespace=NAMESPACE,
            logging_level="error" if quiet else "warning",
            log_to_driver=not quiet,
        )
    except ConnectionError as exc:
        raise StartupError(f"cannot join the cluster at {address}: {exc}") from None


def _init_ray(settings: CorralSettings) -> bool:
    """Join the cluster the settings name, or start a private one; True if we own it."""
    state = settings.state_path
    record = NodeRecord.read(state)
    if record is not None and record.kind == "serve":
        raise StartupError(
            f"corral serve already runs from {state} (pid {record.pid}); stop it first, "
            f"or use another state directory (CORRAL_STATE_DIR)"
        )
    if address := cluster_address(settings):
        join_cluster(address, settings)  # this box runs a node: serve its cluster
        return False
    use_in_this_process(ensure_token(token_path(state)))  # inherited by the Ray processes
    name = settings.node.name or socket.gethostname()
    kernels = cpu_kernels.current()  # probed once per box, then cached; replicas reuse it
    ray.init(
        address="local",  # a new cluster, never one Ray finds running on this box
        _node_ip_address=loopback_only(),  # nothing of it faces the network
        namespace=NAMESPACE,
        include_dashboard=settings.dashboard,
        dashboard_host="127.0.0.1",
        labels={LABEL_NODE: name, LABEL_ROLE: "head", LABEL_CPU_KERNELS: kernels.slug},
        logging_level="warning",
        _system_config=SYSTEM_CONFIG,
    )
    gcs = ray.get_runtime_context().gcs_address
    NodeRecord(name, "head", gcs, pid=os.getpid(), kind="serve").write(state)
    return True


def _this_node() -> dict[str, str] | None:
    """A label selector for the node this process runs on: the API binds here."""
    name = ray.get_runtime_context().get_node_labels().get(LABEL_NODE)
    return {LABEL_NODE: name} if name else None


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
