"""Waiting for placements to run (``cluster/serve_apps.py``), over a fake Serve."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

from cluster.serve_apps import AppState, Loading, app_name_for, last_line, wait_running


class FakeServe:
    """``ServeApps`` whose states come from a script, one step per ``states()`` call."""

    def __init__(self, script: list[dict[str, AppState]]) -> None:
        self.script, self.asked = script, 0

    async def deploy(self, name, app) -> None:
        raise AssertionError("not deployed here")

    async def scale(self, name: str, replicas: int) -> None:
        raise AssertionError("not scaled here")

    async def delete(self, names: Sequence[str], *, drain: bool = True) -> None:
        raise AssertionError("not deleted here")

    async def states(self) -> dict[str, AppState]:
        step = self.script[min(self.asked, len(self.script) - 1)]
        self.asked += 1
        return step


def loading(model: str, node: str, replicas: int = 1) -> Loading:
    return Loading(app_name_for(model, node), node, replicas, f"{model} on {node}")


def wait(
    serve: FakeServe, placements: list[Loading], *, alive=frozenset(), crashed=None, timeout=5.0
):
    return asyncio.run(
        wait_running(
            serve,
            placements,
            timeout,
            alive=lambda: set(alive),
            crashed=crashed or (lambda app, node, at_least: None),
        )
    )


def test_a_placement_runs_once_all_its_replicas_do():
    a = loading("a:1", "nas", replicas=2)
    serve = FakeServe(
        [
            {},
            {a.app: AppState("DEPLOYING", 0, "")},
            {a.app: AppState("RUNNING", 1, "")},
            {a.app: AppState("RUNNING", 2, "")},
        ]
    )
    assert wait(serve, [a]) == {}
    assert serve.asked == 4


def test_failures_say_why_each_placement_did_not_run():
    crashed, gone, looping, slow = (
        loading("crash:1", "nas"),
        loading("gone:1", "laptop"),
        loading("loop:1", "nas"),
        loading("slow:1", "nas"),
    )
    states = {
        crashed.app: AppState("DEPLOY_FAILED", 0, "Traceback ...\nActorDiedError()"),
        gone.app: AppState("DEPLOYING", 0, ""),
        looping.app: AppState("DEPLOYING", 0, ""),
        slow.app: AppState("DEPLOYING", 0, "Deploying: waiting for resources\nno node fits"),
    }

    def crash_loop(app, node, at_least):
        return "its process on nas crashed 3 times in 5s" if app == looping.app else None

    failed = wait(
        FakeServe([states]),
        [crashed, gone, looping, slow],
        alive={"nas"},
        crashed=crash_loop,
        timeout=0.1,
    )
    assert failed == {
        "crash:1 on nas": "ActorDiedError()",
        "gone:1 on laptop": "laptop left the cluster while it loaded",
        "loop:1 on nas": "its process on nas crashed 3 times in 5s",
        "slow:1 on nas": "not running after 0s: no node fits",
    }


def test_the_last_line_of_a_remote_error():
    assert last_line("Traceback:\n  File x\nValueError: bad\n\n") == "ValueError: bad"
    assert last_line("") == "unknown error"
