"""Two real ``corral node start`` processes on this machine form one cluster, then stop."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import psutil
import yaml

from tests.conftest import free_port

CORRAL = str(Path(sys.executable).with_name("corral"))


def corral(*args: str, timeout: float = 180) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CORRAL_", "RAY_"))}
    return subprocess.run([CORRAL, *args], env=env, capture_output=True, text=True, timeout=timeout)


def processes_using(path: Path) -> list[psutil.Process]:
    found = []
    for p in psutil.process_iter(["cmdline"]):
        try:
            if any(str(path) in part for part in p.info["cmdline"] or []):
                found.append(p)
        except psutil.Error:
            pass
    return found


WORKER_PORTS = (23000, 23999)  # below the ephemeral ports free_port() hands out
# Fixed by Ray (AUTOSCALER_METRIC_PORT, DASHBOARD_METRIC_PORT): the head's metrics
HEAD_METRICS = {44217, 44227}


def listening(processes: list[psutil.Process]) -> dict[int, str]:
    """port -> process name, for every socket ``processes`` and their children listen on."""
    found = {}
    for p in {c for root in processes for c in (root, *root.children(recursive=True))}:
        try:
            found |= {
                c.laddr.port: p.name() for c in p.net_connections("inet") if c.status == "LISTEN"
            }
        except psutil.Error:
            pass
    return found


def check_ports(processes: list[psutil.Process], host: str, named: dict[str, int]) -> None:
    """Every port the node listens on is one of ``named`` (the firewall names them all),
    the head's fixed metrics ports, or in the worker range; and the only ones that
    answer without the cluster token are the Prometheus metrics (the README says so)."""
    ports = listening(processes)
    low, high = WORKER_PORTS
    stray = {
        port: name
        for port, name in ports.items()
        if port not in named.values() and port not in HEAD_METRICS and not low <= port <= high
    }
    assert stray == {}, f"ports no setting pins (the firewall cannot name them): {stray}"
    assert {named["port"], named["node_manager_port"], named["object_manager_port"]} <= set(ports)

    def status(port: int) -> int:
        return httpx.get(f"http://{host}:{port}/", timeout=5).status_code

    assert status(named["metrics_export_port"]) == 200  # Prometheus text, no token
    assert status(named["agent_port"]) == 401  # "Missing authentication token"
    assert status(named["runtime_env_agent_port"]) == 401


def test_a_head_and_a_worker_form_one_cluster_and_stop_cleanly(tmp_path):
    head_dir, worker_dir = tmp_path / "head", tmp_path / "worker"
    # Ray's socket paths must stay short: its session files go under /tmp directly.
    ray_dir = Path(tempfile.mkdtemp(prefix="crl-", dir="/tmp"))
    port = free_port()
    # The head pins every port, as the Ansible roles do, so the firewall can name them.
    pinned = {
        name: free_port()
        for name in (
            "node_manager_port", "object_manager_port", "metrics_export_port",
            "dashboard_agent_grpc_port", "runtime_env_agent_port",
        )
    }  # fmt: skip
    low, high = WORKER_PORTS
    config = tmp_path / "corral.yaml"
    node = {**pinned, "min_worker_port": low, "max_worker_port": high}
    config.write_text(yaml.safe_dump({"node": node}))
    named = {
        **pinned,
        "port": port,
        "dashboard_port": free_port(),
        "client_port": free_port(),
        "agent_port": free_port(),
    }
    head = [
        "node", "start", "--head", "--name", "alpha", "--port", str(port),
        "--dashboard-port", str(named["dashboard_port"]),
        "--client-port", str(named["client_port"]),
        "--agent-port", str(named["agent_port"]), "--temp-dir", str(ray_dir / "h"),
        "--state-dir", str(head_dir), "--reserve-ram", "1GiB", "--config", str(config),
    ]  # fmt: skip
    worker = [
        "node", "start", "--address", f"127.0.0.1:{port}", "--name", "beta",
        "--agent-port", str(free_port()), "--temp-dir", str(ray_dir / "w"),
        "--state-dir", str(worker_dir), "--max-ram", "2GiB",
    ]  # fmt: skip
    try:
        started = corral(*head)
        assert started.returncode == 0, started.stderr
        assert "Started head 'alpha'" in started.stderr
        worker_dir.mkdir()
        shutil.copy(head_dir / "ray-token", worker_dir / "ray-token")
        joined = corral(*worker)
        assert joined.returncode == 0, joined.stderr
        assert "as 'beta'" in joined.stderr

        third = tmp_path / "third"
        third.mkdir()
        shutil.copy(head_dir / "ray-token", third / "ray-token")
        again = corral(*worker[:-2], "--state-dir", str(third))
        assert again.returncode == 1 and "already in the cluster" in again.stderr

        listed = corral("nodes", "--state-dir", str(worker_dir), "--json")
        assert listed.returncode == 0, listed.stderr
        rows = {n["name"]: n for n in json.loads(listed.stdout)}
        assert set(rows) == {"alpha", "beta"}
        assert rows["alpha"]["role"] == "head" and rows["beta"]["role"] == "worker"
        assert all(n["state"] == "up" and n["cpu_cores"] for n in rows.values())
        assert rows["beta"]["ram_offered"] == 2 * 1024**3  # --max-ram
        host = rows["alpha"]["address"]  # the node's address: its agents listen there
        check_ports(processes_using(ray_dir / "h"), host, named)
    finally:
        stop_worker = corral("node", "stop", "--state-dir", str(worker_dir))
        stop_head = corral("node", "stop", "--state-dir", str(head_dir))
    assert stop_worker.returncode == 0 and "Stopped node 'beta'" in stop_worker.stderr
    assert stop_head.returncode == 0 and "Stopped node 'alpha'" in stop_head.stderr
    deadline = time.monotonic() + 20
    while processes_using(ray_dir) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert processes_using(ray_dir) == []
    shutil.rmtree(ray_dir, ignore_errors=True)
    assert not (head_dir / "node.json").exists() and not (worker_dir / "node.json").exists()
