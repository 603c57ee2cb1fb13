"""``corral plan`` / ``corral apply`` on the simulated homelab: replicas land exactly where
the plan says, a second apply changes nothing, an edit changes only what differs.

The tests run in order and share the cluster's state; the last one applies an
empty file so the models declared here are gone for the other modules.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import httpx
import openai
import pytest
from ray import serve

from cluster.serve_apps import app_name_for
from deployments.replica import REPLICA_DEPLOYMENT

CORRAL = str(Path(sys.executable).with_name("corral"))

V1 = """\
models:
  - name: smol-a
    source: {starter}
    context: 1024
    threads: 1
    replicas: 2
    placement:
      nodes: [gpubox, nas]
  - name: smol-b
    source: {starter}
    context: 512
    threads: 1
    placement:
      labels: {{corral.role: head}}
"""
# smol-a keeps one replica and leaves the nas, smol-b gets a longer context.
V2 = (
    V1.replace("replicas: 2", "replicas: 1")
    .replace("nodes: [gpubox, nas]", "nodes: [gpubox]")
    .replace("context: 512", "context: 1024")
)

# smol-a goes to two replicas on the same node: a scale, not a reload.
V3 = V2.replace("replicas: 1", "replicas: 2").replace(
    "nodes: [gpubox]", "nodes: [gpubox]\n      strategy: pack"
)


@pytest.fixture(scope="module")
def files(tmp_path_factory, starter_path) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("models")
    texts = {"v1": V1, "v2": V2, "v3": V3, "empty": "models: []\n"}
    paths = {}
    for name, text in texts.items():
        paths[name] = root / f"{name}.yaml"
        paths[name].write_text(text.format(starter=starter_path))
    return paths


def corral_cli(homelab, *args: str) -> subprocess.CompletedProcess:
    cluster = ["--address", homelab.address, "--state-dir", str(homelab.state_dir)]
    return subprocess.run(
        [CORRAL, *args, *cluster], capture_output=True, text=True, timeout=300, check=False
    )


def cli_json(homelab, *args: str, code: int = 0) -> dict:
    done = corral_cli(homelab, *args, "--json")
    assert done.returncode == code, done.stderr[-3000:]
    return json.loads(done.stdout)


def ops(report: dict) -> set[tuple[str, str, str]]:
    return {(c["op"], c["model"], c["node"]) for c in report["changes"]}


def api_placements(corral) -> dict[tuple[str, str], dict]:
    r = httpx.get(f"{corral.url}/api/cluster/placements", timeout=30)
    assert r.status_code == 200
    return {(p["model"], p["node"]): p for p in r.json()["placements"]}


def ours(placements: dict) -> dict:
    return {k: v for k, v in placements.items() if k[0].startswith("smol-")}


def replica_info(model: str, node: str):
    """What the replica of ``model`` on ``node`` says about itself (node, pid, context)."""
    handle = serve.get_deployment_handle(REPLICA_DEPLOYMENT, app_name_for(model, node))
    return handle.info.remote().result(timeout_s=30)


def test_plan_lists_what_apply_would_add_and_changes_nothing(corral, homelab, files):
    report = cli_json(homelab, "plan", "-f", str(files["v1"]))
    assert ops(report) == {
        ("+", "smol-a:latest", "gpubox"),
        ("+", "smol-a:latest", "nas"),
        ("+", "smol-b:latest", "minipc"),
    }
    after = {(c["model"], c["node"]): c["after"] for c in report["changes"]}
    assert after["smol-b:latest", "minipc"]["context"] == 512
    assert after["smol-a:latest", "nas"]["ram"] > 100 * 1024**2  # the estimate, not zero
    assert report["unplaced"] == [] and report["failed"] == {}
    assert ours(api_placements(corral)) == {}  # a plan starts nothing

    text = corral_cli(homelab, "plan", "-f", str(files["v1"]))
    assert text.returncode == 0, text.stderr
    assert "+ smol-a:latest on nas: 1 replica, context 1024, 4 slots, 1 threads, CPU" in text.stdout
    assert "Plan: 3 to add, 0 to change, 0 to remove." in text.stdout


def test_apply_puts_replicas_on_exactly_the_planned_nodes(corral, homelab, files):
    report = cli_json(homelab, "apply", "-f", str(files["v1"]))
    assert report["failed"] == {}
    planned = {(p["model"], p["node"]) for p in report["placements"]}
    running = ours(api_placements(corral))
    assert set(running) == {k for k in planned if k[0].startswith("smol-")}
    for (model, node), p in running.items():
        assert p["status"] == "RUNNING"
        info = replica_info(model, node)
        assert info.node == node, f"{model} planned on {node} runs on {info.node}"
        assert info.n_ctx == p["context"]
    # The model answers, through the real engine, from where it was placed.
    client = openai.OpenAI(base_url=f"{corral.url}/v1", api_key="-", max_retries=0, timeout=60)
    reply = client.chat.completions.create(
        model="smol-b", messages=[{"role": "user", "content": "Say hi."}], max_tokens=8
    )
    assert reply.choices[0].message.content
    assert "smol-a:latest" in {m.id for m in client.models.list().data}


def test_a_second_apply_of_the_same_file_changes_nothing(corral, homelab, files):
    before = {k: replica_info(*k).pid for k in ours(api_placements(corral))}
    report = cli_json(homelab, "apply", "-f", str(files["v1"]))
    assert report["changes"] == []
    assert len([u for u in report["unchanged"] if u.startswith("smol-")]) == 3
    assert {k: replica_info(*k).pid for k in before} == before  # no replica restarted
    text = corral_cli(homelab, "plan", "-f", str(files["v1"]))
    assert "No changes" in text.stdout


def test_an_edited_file_changes_only_what_differs(corral, homelab, files):
    before = {k: replica_info(*k) for k in ours(api_placements(corral))}
    report = cli_json(homelab, "apply", "-f", str(files["v2"]))
    assert ops(report) == {("-", "smol-a:latest", "nas"), ("~", "smol-b:latest", "minipc")}
    reload = {(c["model"], c["node"]): c["reload"] for c in report["changes"]}
    assert reload["smol-b:latest", "minipc"] is True
    running = ours(api_placements(corral))
    assert set(running) == {("smol-a:latest", "gpubox"), ("smol-b:latest", "minipc")}
    kept = replica_info("smol-a:latest", "gpubox")
    assert kept.pid == before["smol-a:latest", "gpubox"].pid  # untouched
    reloaded = replica_info("smol-b:latest", "minipc")
    assert reloaded.pid != before["smol-b:latest", "minipc"].pid
    assert reloaded.n_ctx == 1024 and reloaded.node == "minipc"


def test_more_replicas_of_a_placement_leave_the_running_one_alone(corral, homelab, files):
    running = replica_info("smol-a:latest", "gpubox").pid
    report = cli_json(homelab, "apply", "-f", str(files["v3"]))
    [change] = report["changes"]
    assert (change["op"], change["node"], change["reload"]) == ("~", "gpubox", False)
    assert (change["before"]["replicas"], change["after"]["replicas"]) == (1, 2)
    pids: set[int] = set()
    deadline = time.monotonic() + 30  # until this driver's handle has seen the new replica
    while len(pids) < 2 and time.monotonic() < deadline:
        pids.add(replica_info("smol-a:latest", "gpubox").pid)
    assert running in pids and len(pids) == 2


def test_plan_explains_what_cannot_be_placed(corral, homelab, tmp_path, starter_path):
    path = tmp_path / "models.yaml"
    path.write_text(
        f"models:\n  - name: smol-tpu\n    source: {starter_path}\n"
        f"    placement: {{labels: {{corral.gpu: tpu-v5}}}}\n"
    )
    report = cli_json(homelab, "plan", "-f", str(path))
    [missing] = report["unplaced"]
    assert missing["model"] == "smol-tpu:latest" and missing["placed"] == 0
    assert "needs" in missing["reason"]
    assert "gpubox has label corral.gpu=nvidia-geforce-rtx-3090, not tpu-v5" in missing["reason"]
    text = corral_cli(homelab, "plan", "-f", str(path))
    assert "! smol-tpu:latest: 0 of 1 replica placed" in text.stdout


def test_bad_files_are_refused_before_anything_changes(corral, homelab, tmp_path):
    broken = tmp_path / "broken.yaml"
    broken.write_text("models:\n  - name: smol-x\n    placement:\n      gpu: sometimes\n")
    done = corral_cli(homelab, "apply", "-f", str(broken))
    assert done.returncode == 2
    assert f"{broken}:4: models[0].placement.gpu" in done.stderr
    assert "'auto', 'required' or 'never'" in done.stderr

    unknown = tmp_path / "unknown.yaml"
    unknown.write_text("models:\n  - name: nosuch:7b\n")
    done = corral_cli(homelab, "apply", "-f", str(unknown))
    assert done.returncode == 2
    assert "nosuch:7b" in done.stderr and "Corral has" in done.stderr
    assert ("smol-a:latest", "gpubox") in api_placements(corral)  # nothing was removed


def test_applying_an_empty_file_removes_the_declared_models(corral, homelab, files):
    report = cli_json(homelab, "apply", "-f", str(files["empty"]))
    assert ops(report) == {("-", "smol-a:latest", "gpubox"), ("-", "smol-b:latest", "minipc")}
    assert ours(api_placements(corral)) == {}
