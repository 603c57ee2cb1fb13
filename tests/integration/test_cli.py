"""The ``corral`` command as a user runs it: a real ``corral serve`` process."""

from __future__ import annotations

import ipaddress
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import openai
import psutil
import pytest

from tests.conftest import free_port

CORRAL = str(Path(sys.executable).with_name("corral"))


def ray_core_pids() -> set[int]:
    names = {"gcs_server", "raylet"}
    return {p.pid for p in psutil.process_iter(["name"]) if p.info["name"] in names}


def listening(pid: int) -> set[tuple[str, int, str]]:
    """(address, port, process name) of every socket that ``pid`` and its descendants
    (Ray's GCS, raylet, agents, workers and replicas) listen on."""
    root = psutil.Process(pid)
    found = set()
    for p in [root, *root.children(recursive=True)]:
        try:
            sockets = p.net_connections(kind="inet")
            name = p.name()
        except psutil.Error:
            continue  # gone meanwhile
        found |= {(c.laddr.ip, c.laddr.port, name) for c in sockets if c.status == "LISTEN"}
    return found


def is_loopback(ip: str) -> bool:
    address = ipaddress.ip_address(ip)
    mapped = getattr(address, "ipv4_mapped", None)  # ::ffff:127.0.0.1
    return (mapped or address).is_loopback


def corral_env(tmp_path: Path, port: int) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CORRAL_", "RAY_"))}
    return {**env, "CORRAL_HOST": f"127.0.0.1:{port}", "CORRAL_STATE_DIR": str(tmp_path / "state")}


def test_version_and_help():
    out = subprocess.run([CORRAL, "--version"], capture_output=True, text=True, check=True).stdout
    assert out.startswith("corral ")
    help_text = subprocess.run(
        [CORRAL, "--help"], capture_output=True, text=True, check=True
    ).stdout
    assert "serve" in help_text
    serve_help = subprocess.run(
        [CORRAL, "serve", "--help"], capture_output=True, text=True, check=True
    ).stdout
    assert "--host" in serve_help and "OLLAMA_HOST" in serve_help


def test_corral_serve_serves_the_starter_model_and_stops_cleanly(tmp_path):
    port = free_port()
    before = ray_core_pids()
    proc = subprocess.Popen(
        [CORRAL, "serve", "--no-dashboard", "--num-threads", "2"],
        env=corral_env(tmp_path, port),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 180
        while True:
            assert proc.poll() is None, proc.stdout.read()
            try:
                if httpx.get(url, timeout=2).text == "Corral is running":
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "corral serve did not answer within 180 s"
            time.sleep(0.5)
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
        assert [m.id for m in client.models.list()] == ["smollm2:135m"]
        reply = client.chat.completions.create(
            model="smollm2:135m", messages=[{"role": "user", "content": "Hi"}], max_tokens=8
        )
        assert reply.choices[0].message.content
        # `corral ps` asks the API: the model just used, on this box, idle, unloading in ~5m.
        ps = subprocess.run(
            [CORRAL, "ps", "--host", f"127.0.0.1:{port}"], capture_output=True, text=True
        )
        assert ps.returncode == 0, ps.stderr
        header, row = ps.stdout.splitlines()[:2]
        assert header.split()[:5] == ["MODEL", "NODE", "REPLICAS", "SLOTS", "USED"]
        assert row.split()[:4] == ["smollm2:135m", socket.gethostname(), "1", "0/4"]
        assert " in 4m" in row or " in 5m" in row, row  # keep_alive 5m counts down
        rows = json.loads(
            subprocess.run(
                [CORRAL, "ps", "--json", "--host", f"127.0.0.1:{port}"],
                capture_output=True,
                text=True,
                check=True,
            ).stdout
        )
        assert [(r["model"], r["in_flight"], r["pinned"]) for r in rows] == [
            ("smollm2:135m", 0, False)
        ]
        # A box alone faces nothing beyond loopback: not the API (CORRAL_HOST says
        # 127.0.0.1), not Ray's GCS, raylet, agents, metrics, workers or replicas.
        sockets = listening(proc.pid)
        assert ("127.0.0.1", port) in {(ip, p) for ip, p, _ in sockets}, sockets
        assert {"gcs_server", "raylet"} <= {name for _, _, name in sockets}, sockets
        assert [s for s in sockets if not is_loopback(s[0])] == []
        # ... and a command that joins its cluster still finds it there.
        nodes = subprocess.run(
            [CORRAL, "nodes", "--json"],
            env=corral_env(tmp_path, port),
            capture_output=True,
            text=True,
        )
        assert nodes.returncode == 0, nodes.stderr
        assert [n["name"] for n in json.loads(nodes.stdout)] == [socket.gethostname()]
        # The Ray token lives in the state dir, readable by its owner only.
        token = tmp_path / "state" / "ray-token"
        assert token.stat().st_mode & 0o777 == 0o600
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            output, _ = proc.communicate(timeout=90)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise
    assert proc.returncode == 0, output[-3000:]
    assert "is serving on" in output and "Stopping Corral" in output
    with pytest.raises(httpx.HTTPError):
        httpx.get(url, timeout=2)
    # Its private Ray cluster is gone with it (the test session's own cluster stays).
    leftover = set()
    for _ in range(50):
        leftover = ray_core_pids() - before
        if not leftover:
            break
        time.sleep(0.2)
    assert not leftover


def test_node_start_dry_run_shows_inventory_and_command_and_starts_nothing(tmp_path):
    fixture = Path(__file__).parents[1] / "fixtures" / "nodes" / "gpu-rtx3090-24g-ram64g.yaml"
    r = subprocess.run(
        [CORRAL, "node", "start", "--address", "10.0.0.2:6379", "--inventory", str(fixture),
         "--reserve-ram", "4GiB", "--dry-run", "--state-dir", str(tmp_path)],
        # The box's own CPU kernels otherwise (probed): the override makes them known.
        env={**os.environ, "CORRAL_LLAMA_EXTRA_BUFTS": "off"},
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert "As worker 'gpubox' it offers 59.0 GiB RAM and 23.5 GiB VRAM" in r.stderr
    assert "CPU kernels (llama.cpp): plain (extra buffer types off by" in r.stderr
    command = r.stdout.strip().splitlines()[-1]
    assert command.endswith(" start --address=10.0.0.2:6379 --memory=63350767616"
                            " --object-store-memory=1073741824 --num-gpus=1"
                            " '--resources={\"vram_mib\": 24064}'"
                            " --labels=corral.node=gpubox,corral.gpu=nvidia-geforce-rtx-3090,"
                            "corral.role=worker,corral.cpu_kernels=plain"
                            " --dashboard-agent-listen-port=52365"
                            " --disable-usage-stats --block")  # fmt: skip
    assert "hostname: gpubox" in r.stdout and "NVIDIA GeForce RTX 3090" in r.stdout
    assert not (tmp_path / "node.json").exists()


def test_broken_config_names_the_line_and_exits_2(tmp_path):
    cfg = tmp_path / "corral.yaml"
    cfg.write_text("host: 127.0.0.1:11434\nnum_ctx: 4096\nthreads: 2\n")
    r = subprocess.run(
        [CORRAL, "serve", "--config", str(cfg)],
        env=corral_env(tmp_path, free_port()),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 2
    assert f"{cfg}:3: threads: unknown setting" in r.stderr.replace("\n", "")


def test_port_in_use_is_a_one_line_error(tmp_path):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        r = subprocess.run(
            [CORRAL, "serve", "--no-dashboard"],
            env=corral_env(tmp_path, port),
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert r.returncode == 1
    assert f"Cannot listen on 127.0.0.1:{port}" in r.stderr.replace("\n", "")
    assert "CORRAL_HOST" in r.stderr.replace("\n", "")
