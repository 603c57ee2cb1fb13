"""``corral ps``: the table from the API's placement rows, and where it asks."""

from __future__ import annotations

import pytest
from rich.console import Console

from cluster.cli_ps import failure_lines, ps_table
from deployments.views import PlacementView
from tests.support.views import placement_view

NOW = 1_800_000_000.0


def row(**changes) -> PlacementView:
    """A row of ``GET /api/cluster/placements`` as the CLI reads it back."""
    base = {
        "ram": 2 * 1024**3,
        "idle_for": 42.0,
        "expires_at": NOW + 258,
        "keep_alive": 300.0,
        "slots": 0,
    }
    return placement_view("llama3.2:1b", "gpubox", **{**base, **changes})


def render(rows: list[PlacementView]) -> list[str]:
    console = Console(width=200, record=True)
    console.print(ps_table(rows, NOW))
    return [line.split() for line in console.export_text().splitlines()]


def test_a_row_says_node_load_idle_time_and_expiry():
    header, line = render([row()])
    assert header[:2] == ["MODEL", "NODE"]
    assert line == ["llama3.2:1b", "gpubox", "1", "0", "42s", "in", "4m18s", "no", "2.0", "GiB"]


@pytest.mark.parametrize(
    ("changes", "until"),
    [
        ({"in_flight": 3, "idle_for": None, "expires_at": None}, ["busy"]),
        ({"expires_at": None}, ["forever"]),  # keep_alive -1
        ({"held": True, "expires_at": None, "min": 1}, ["kept", "(replicas.min)"]),
        ({"expires_at": NOW - 1}, ["now"]),
    ],
)
def test_until_says_when_keep_alive_unloads(changes, until):
    _, line = render([row(**changes)])
    assert line[5 : 5 + len(until)] == until


def test_a_loading_placement_and_vram_show():
    _, line = render([row(status="DEPLOYING", replicas=2, vram=1024**3, pinned=True)])
    assert line[2:4] == ["2", "(deploying)"]
    assert line[-7:] == ["yes", "4.0", "GiB", "+", "2.0", "GiB", "VRAM"]  # both replicas


def test_a_failed_model_says_when_it_is_retried_and_why():
    why = "its process on gpubox crashed 3 times in 5s; last: SIGSEGV (Segmentation fault)"
    failure = {"reason": why, "since": NOW - 5, "retry_at": NOW + 25, "attempts": 1}
    failed = row(status="FAILED", replicas=0, ram=0, idle_for=None, failure=failure)
    _, line = render([failed])
    assert line[:7] == ["llama3.2:1b", "gpubox", "0", "(failed)", "0", "-", "retry"]
    assert line[7] == "in" and line[8] == "25s"
    assert failure_lines([row(), failed]) == [f"llama3.2:1b on gpubox FAILED: {why}"]
