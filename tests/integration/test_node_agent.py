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

import psutil

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


def test_a_head_and_a_worker_form_one_cluster_and_stop_cleanly(tmp_path):
    head_dir, worker_dir = tmp_path / "head", tmp_path / "worker"
    # Ray's socket paths must stay short: its session files go under /tmp directly.
    ray_dir = Path(tempfile.mkdtemp(prefix="crl-", dir="/tmp"))
    port = free_port()
    head = [
        "node", "start", "--head", "--name", "alpha", "--port", str(port),
        "--dashboard-port", str(free_port()), "--client-port", str(free_port()),
        "--agent-port", str(free_port()), "--temp-dir", str(ray_dir / "h"),
        "--state-dir", str(head_dir), "--reserve-ram", "1GiB",
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
