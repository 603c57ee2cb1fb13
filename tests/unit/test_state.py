"""The controller's saved state (``cluster/state.py``) and the pure steps of a recovery:
which running applications a new controller adopts, and the bookkeeping of replicas lost
with a node (``cluster/controller.py``)."""

from __future__ import annotations

import json
import math

import pytest

from cluster.controller import trim_lost
from cluster.planner import Placement
from cluster.serve_apps import adoptable, app_name_for
from cluster.spec import ModelSpec
from cluster.state import FORMAT, SavedState, load_state, save_state

GIB = 1024**3


def placement(model: str, node: str, replicas: int = 1) -> Placement:
    return Placement(model, node, replicas, 2048, 4, 0, GIB, 0, "/m.gguf", reason="fits")


def spec(**fields) -> ModelSpec:
    return ModelSpec.model_validate({"name": "llama3.2", **fields})


FULL = SavedState(
    declared=(
        spec(
            source="/models/llama.gguf",
            replicas={"min": 1, "max": 3},
            placement={"nodes": ["gpubox"], "gpu": "required"},
            keep_alive=-1,  # forever: JSON has no infinity
            autoscaling={"target": 2, "downscale_delay": -1},
            engine="fake",
            engine_options={"token_delay": 0.01},
        ),
        spec(name="qwen2.5:14b", keep_alive="30m"),
    ),
    on_demand=("phi3:mini",),
    placements=(placement("llama3.2:latest", "gpubox", 2), placement("phi3:mini", "nas")),
    lost=(placement("qwen2.5:14b", "laptop"),),
    saved_at=1_700_000_000.0,
)


def test_the_state_comes_back_as_it_was_saved(tmp_path):
    path = tmp_path / "state.json"
    save_state(path, FULL)
    back = load_state(path)
    assert back == FULL
    assert back.saved_at == FULL.saved_at
    assert back.declared[0].keep_alive == math.inf
    assert back.declared[0].autoscaling.downscale_delay == math.inf
    assert [p.reason for p in back.placements] == ["fits", "fits"]
    assert json.loads(path.read_text())["format"] == FORMAT


def test_no_file_is_no_state(tmp_path):
    assert load_state(tmp_path / "state.json") is None


@pytest.mark.parametrize(
    "text",
    [
        "",
        "{not json",
        "[]",
        '{"format": 99, "declared": []}',
        '{"format": 1}',
        '{"format": 1, "declared": [{"name": "../x"}], "on_demand": [], "placements": []}',
        '{"format": 1, "declared": [], "on_demand": [], "placements": [{"model": "a"}]}',
        '{"format": 1, "declared": [], "on_demand": [], "placements": [{"colour": 1}]}',
    ],
)
def test_an_unreadable_file_is_set_aside_with_a_warning(tmp_path, caplog, text):
    path = tmp_path / "state.json"
    path.write_text(text)
    assert load_state(path) is None
    assert not path.exists()
    assert (tmp_path / "state.json.bad").read_text() == text
    assert "apply your models file again" in caplog.text


def test_a_save_replaces_the_file_whole(tmp_path):
    path = tmp_path / "state.json"
    save_state(path, FULL)
    save_state(path, SavedState())
    assert load_state(path) == SavedState()
    assert [p.name for p in tmp_path.iterdir()] == ["state.json"]  # no temporary files left


def test_a_new_controller_adopts_what_still_runs_and_removes_what_nobody_knows():
    running, failed, gone = (
        placement("a:latest", "gpubox"),
        placement("b:latest", "nas"),
        placement("c:latest", "nas"),
    )
    apps = {
        app_name_for(*running.key): "RUNNING",
        app_name_for(*failed.key): "DEPLOY_FAILED",
        app_name_for("stray:latest", "nas"): "RUNNING",  # deployed, never saved
        "corral": "RUNNING",  # the ingress: not a placement
    }
    adopted, orphans = adoptable([running, failed, gone], apps)
    assert adopted == [running]
    assert orphans == sorted([app_name_for(*failed.key), app_name_for("stray:latest", "nas")])


@pytest.mark.parametrize("status", ["RUNNING", "DEPLOYING", "UNHEALTHY"])
def test_adoptable_states(status):
    p = placement("a:latest", "gpubox")
    assert adoptable([p], {app_name_for(*p.key): status}) == ([p], [])


def test_replicas_placed_again_come_off_the_lost_ones():
    lost = {
        ("a", "nas"): placement("a", "nas", 2),
        ("a", "laptop"): placement("a", "laptop", 1),
        ("b", "nas"): placement("b", "nas", 1),
    }
    assert trim_lost(lost, "a", 1) == "1 replica on laptop"
    assert set(lost) == {("a", "nas"), ("b", "nas")}
    assert trim_lost(lost, "a", 1) == "1 replica on nas"
    assert lost[("a", "nas")].replicas == 1
    assert trim_lost(lost, "a", 5) == "1 replica on nas"
    assert set(lost) == {("b", "nas")}
    assert trim_lost(lost, "c", 1) == "nothing"
