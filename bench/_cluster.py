"""A simulated homelab for the benchmarks, and Corral on it, torn down whatever happens.

The same recipe as ``tests/conftest.py``: Ray nodes on this machine
(``ray.cluster_utils.Cluster``), each started with the resources and labels
``corral node start`` would give the box a fixture file describes (renamed as
the benchmark likes), one logical CPU each, token auth on; Corral is started on
it by ``start_corral``, exactly as ``corral serve`` starts it.

``homelab(...)`` and ``corral_on(...)`` are context managers: leaving them (an
error, Ctrl-C, SIGTERM) stops Corral, disconnects, kills every Ray process of
the cluster and removes the state directory.
"""

from __future__ import annotations

import contextlib
import json
import logging
import shutil
import signal
import socket
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


@dataclass(frozen=True)
class SimNode:
    """One simulated box: the hardware fixture it pretends to be, its role and name."""

    fixture: str  # a file of tests/fixtures/nodes, without .yaml
    role: str  # "head" or "worker"
    name: str  # its corral.node label


@dataclass
class Homelab:
    cluster: Any  # ray.cluster_utils.Cluster
    state_dir: Path
    nodes: list[SimNode]

    @property
    def address(self) -> str:
        return self.cluster.address


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def node_args(node: SimNode) -> dict:
    """``Cluster.add_node`` arguments for ``node``, as the test suite's homelab builds them."""
    from tests.conftest import simulated_node

    return simulated_node(node.fixture, node.role, node.name)


def _sigterm_as_interrupt() -> None:
    """SIGTERM unwinds like Ctrl-C, so every ``finally`` below still runs."""

    def handler(signum, frame):  # noqa: ARG001
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, handler)


@contextlib.contextmanager
def homelab(nodes: list[SimNode]) -> Iterator[Homelab]:
    """A Ray cluster of ``nodes`` (the first is the head) with this process connected."""
    import ray
    from ray.cluster_utils import Cluster

    from deployments.actors import NAMESPACE
    from nodes.rayenv import SYSTEM_CONFIG, ensure_token, token_path, use_in_this_process

    _sigterm_as_interrupt()
    logging.getLogger("ray").setLevel(logging.WARNING)  # no "Overwriting previous address"
    state_dir = Path(tempfile.mkdtemp(prefix="corral-bench-"))
    cluster = None
    try:
        use_in_this_process(ensure_token(token_path(state_dir)))  # every node inherits it
        head, *workers = nodes
        head_args = {**node_args(head), "include_dashboard": False, "_system_config": SYSTEM_CONFIG}
        cluster = Cluster(initialize_head=True, head_node_args=head_args)
        for node in workers:
            cluster.add_node(**node_args(node))
        cluster.wait_for_nodes()
        # Replica, ingress and controller logs stay in Ray's log files, out of the table.
        ray.init(
            address=cluster.address,
            namespace=NAMESPACE,
            logging_level="error",
            log_to_driver=False,
        )
        _sigterm_as_interrupt()  # again: ray.init installs its own handler, which just dies
        yield Homelab(cluster, state_dir, list(nodes))
    finally:
        with _no_interrupts():
            try:
                ray.shutdown()
            finally:
                if cluster is not None:
                    cluster.shutdown()
                shutil.rmtree(state_dir, ignore_errors=True)


@contextlib.contextmanager
def corral_on(lab: Homelab, **settings: Any) -> Iterator[Any]:
    """Corral served on ``lab`` (``cluster.server.RunningCorral``), stopped on the way out."""
    from cluster.server import start_corral
    from cluster.settings import load_settings

    values = {
        "host": f"127.0.0.1:{free_port()}",
        "state_dir": lab.state_dir,
        "dashboard": False,
        "log_level": "warning",
        **settings,
    }
    # No "Application ready" lines, nor warnings about the probes of our own stats handles.
    logging.getLogger("ray.serve").setLevel(logging.ERROR)
    running = start_corral(load_settings(**values))
    try:
        yield running
    finally:
        with _no_interrupts():
            running.stop()


@contextlib.contextmanager
def _no_interrupts() -> Iterator[None]:
    """Finish the cleanup inside even if Ctrl-C comes again; interrupt afterwards."""
    pending: list[int] = []
    previous = signal.signal(signal.SIGINT, lambda signum, _: pending.append(signum))
    previous_term = signal.signal(signal.SIGTERM, lambda signum, _: pending.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        signal.signal(signal.SIGTERM, previous_term)
    if pending:
        raise KeyboardInterrupt


def wait_until(check, timeout: float, interval: float = 0.2, what: str = "condition") -> float:
    """Poll ``check()`` until true; the seconds it took. TimeoutError after ``timeout``."""
    started = time.monotonic()
    while not check():
        if time.monotonic() - started > timeout:
            raise TimeoutError(f"{what} not reached after {timeout:.0f}s")
        time.sleep(interval)
    return time.monotonic() - started


def write_results(out: Path, name: str, json_path: Path | None, results: dict) -> Path:
    """Write ``results`` as JSON to ``json_path`` if given, else ``out/<name>-<time>.json``,
    and say where."""
    if json_path is None:
        out.mkdir(parents=True, exist_ok=True)
        json_path = out / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}.json"
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(results, indent=2))
    print(f"\nwrote {json_path}")
    return json_path


def run_main(main: Callable[[], None]) -> None:
    """Run a benchmark's ``main``; Ctrl-C (or SIGTERM) ends it with what was torn down said."""
    try:
        main()
    except KeyboardInterrupt:
        print("\ninterrupted: Corral and the Ray cluster were stopped", file=sys.stderr)
        sys.exit(130)
