"""Autoscaling and keep-alive as a pure function of constructed load snapshots and times."""

from __future__ import annotations

from dataclasses import replace

from cluster.autoscale import Decision, ModelState, PlacementLoad, Timers, decide
from cluster.spec import ModelSpec
from nodes.durations import FOREVER

M1 = "m1:1b"
NO_TIMERS = Timers()


def spec(
    name: str = M1,
    *,
    min: int = 0,
    max: int = 3,
    target: float = 2,
    up: float = 5,
    down: float = 60,
    keep_alive: float = 300,
) -> ModelSpec:
    return ModelSpec(
        name=name,
        replicas={"min": min, "max": max},
        keep_alive=keep_alive,
        autoscaling={"target": target, "upscale_delay": up, "downscale_delay": down},
    )


def busy(node: str, in_flight: int, replicas: int = 1, model: str = M1, **kw) -> PlacementLoad:
    return PlacementLoad(model, node, replicas, in_flight, idle_since=None, **kw)


def idle(node: str, since: float, replicas: int = 1, model: str = M1, **kw) -> PlacementLoad:
    return PlacementLoad(model, node, replicas, 0, idle_since=since, **kw)


def state(s: ModelSpec, *placements: PlacementLoad, timers: Timers = NO_TIMERS) -> ModelState:
    return ModelState(s, tuple(placements), timers)


def step(s: ModelState, now: float) -> tuple[Decision | None, ModelState]:
    """One ``decide`` for one model: its decision (if any) and the state with the
    returned timers, as the controller hands them back next time."""
    decisions, timers = decide([s], now)
    assert len(decisions) <= 1
    assert set(timers) == {s.spec.name}
    return (decisions[0] if decisions else None), replace(s, timers=timers[s.spec.name])


def run(s: ModelState, times: list[float]) -> list[Decision | None]:
    """The decisions at each of ``times``, the same load throughout, timers carried."""
    out = []
    for now in times:
        decision, s = step(s, now)
        out.append(decision)
    return out


# --- the snapshot types -------------------------------------------------------------


def test_a_model_state_sums_its_placements():
    s = state(spec(), busy("a", 3, replicas=2), idle("b", 10.0), busy("c", 1))
    assert (s.replicas, s.in_flight) == (4, 4)


def test_expires_at_is_idle_since_plus_keep_alive_and_none_while_busy_or_forever():
    assert idle("a", 100.0, keep_alive=30).expires_at == 130.0
    assert idle("a", 100.0, keep_alive=0).expires_at == 100.0
    assert idle("a", 100.0).expires_at is None  # default keep_alive: FOREVER
    assert busy("a", 1, keep_alive=30).expires_at is None
    assert busy("a", 1).key == (M1, "a")


def test_a_decision_describes_itself():
    up = Decision("scale_up", M1, None, 2, "load")
    down = Decision("scale_down", M1, "gpubox", 1, "quiet")
    assert up.describe() == "scale up m1:1b to 2: load"
    assert down.describe() == "scale down m1:1b on gpubox to 1: quiet"


# --- nothing to decide --------------------------------------------------------------


def test_a_model_without_replicas_gets_no_decision_and_fresh_timers():
    s = state(spec(), timers=Timers(above_since=1.0, below_since=2.0))
    decisions, timers = decide([s], now=1000.0)
    assert decisions == []
    assert timers == {M1: Timers()}


def test_a_load_at_the_target_needs_no_change():
    s = state(spec(target=2), busy("a", 4, replicas=2))
    assert run(s, [0, 100, 10_000]) == [None, None, None]
    assert step(s, 0)[1].timers == Timers()


def test_decide_with_no_models_decides_nothing():
    assert decide([], now=5.0) == ([], {})


# --- scale up -----------------------------------------------------------------------


def test_scale_up_once_the_load_stayed_above_target_for_the_upscale_delay():
    s = state(spec(target=2, up=5, max=3), busy("a", 3))
    first, s = step(s, 100.0)
    assert first is None
    assert s.timers == Timers(above_since=100.0)  # the timer starts
    early, s = step(s, 104.9)
    assert early is None and s.timers.above_since == 100.0  # and is kept
    decision, s = step(s, 105.0)
    assert decision is not None
    assert (decision.op, decision.model, decision.node, decision.replicas) == (
        "scale_up",
        M1,
        None,  # the planner picks where
        2,
    )
    assert s.timers == Timers()  # a decision starts the timers afresh


def test_scale_up_reason_gives_the_load_the_time_and_the_target():
    s = state(spec(target=2, up=5), busy("a", 3))
    decision = run(s, [0.0, 5.0])[-1]
    assert decision is not None
    assert decision.reason == "3 requests in flight on 1 replica for 5s (target 2 per replica)"


def test_scale_up_reason_counts_replicas_in_the_plural():
    s = state(spec(target=1.5, up=0, max=5), busy("a", 5, replicas=2), busy("b", 3))
    (decision,) = decide([s], now=0)[0]
    assert "8 requests in flight on 3 replicas" in decision.reason
    assert "target 1.5 per replica" in decision.reason
    assert decision.replicas == 4


def test_an_upscale_delay_of_zero_scales_up_at_once():
    s = state(spec(up=0), busy("a", 3))
    assert run(s, [7.0])[0].op == "scale_up"


def test_timers_carried_from_an_earlier_call_count():
    s = state(spec(up=5), busy("a", 5), timers=Timers(above_since=50.0))
    (decision,) = decide([s], now=55.0)[0]
    assert decision.op == "scale_up"
    assert "for 5s" in decision.reason


def test_scale_up_never_goes_above_replicas_max():
    s = state(spec(max=2, up=0), busy("a", 10), busy("b", 10))
    assert run(s, [0, 5, 60, 3600]) == [None] * 4
    assert step(s, 0)[1].timers == Timers()  # no timer runs toward an impossible step


def test_scale_up_timer_resets_when_the_load_drops():
    s = state(spec(target=2, up=5), busy("a", 3))
    _, s = step(s, 0.0)  # above since 0
    _, s = step(s, 3.0)
    assert s.timers.above_since == 0.0
    s = replace(s, placements=(busy("a", 2),))  # back at the target
    _, s = step(s, 4.0)
    assert s.timers.above_since is None
    s = replace(s, placements=(busy("a", 3),))  # above again: a fresh timer
    decision, s = step(s, 5.0)
    assert decision is None and s.timers.above_since == 5.0
    decision, s = step(s, 9.9)
    assert decision is None
    decision, s = step(s, 10.0)
    assert decision is not None and decision.op == "scale_up"


def test_a_negative_upscale_delay_never_scales_up():
    s = state(spec(up=-1), busy("a", 50))
    assert run(s, [0, 1e6]) == [None, None]


# --- scale down ---------------------------------------------------------------------


def test_scale_down_after_the_downscale_delay_when_fewer_replicas_suffice():
    # 1 request on 2 replicas: 1 carries it at target 2.
    s = state(spec(target=2, down=60), busy("a", 1), idle("b", 90.0))
    first, s = step(s, 100.0)
    assert first is None and s.timers == Timers(below_since=100.0)
    early, s = step(s, 159.0)
    assert early is None and s.timers.below_since == 100.0
    decision, s = step(s, 160.0)
    assert decision is not None
    assert (decision.op, decision.node, decision.replicas) == ("scale_down", "b", 1)
    assert decision.reason == (
        "1 requests in flight on 2 replicas for 1m; 1 carry them at the target 2 per replica"
    )
    assert s.timers == Timers()


def test_scale_down_removes_one_replica_at_a_time():
    s = state(spec(down=0, max=4), busy("a", 0, replicas=4))
    (decision,) = decide([s], now=0)[0]
    assert (decision.op, decision.node, decision.replicas) == ("scale_down", "a", 3)


def test_scale_down_prefers_the_placement_idle_the_longest():
    s = state(
        spec(down=0, max=5),
        busy("busy", 1),
        idle("recent", 90.0),
        idle("oldest", 10.0),
        idle("middle", 50.0),
    )
    (decision,) = decide([s], now=100.0)[0]
    assert decision.node == "oldest"


def test_scale_down_prefers_an_idle_placement_to_a_busy_one():
    # "a" sorts first by name and holds nothing, but it is busy (loading, say).
    s = state(spec(down=0), busy("a", 0), idle("z", 99.0))
    (decision,) = decide([s], now=100.0)[0]
    assert decision.node == "z"


def test_scale_down_with_every_placement_busy_takes_the_least_busy():
    s = state(spec(down=0, max=3, target=4), busy("a", 2), busy("b", 1), busy("c", 3))
    (decision,) = decide([s], now=0)[0]
    assert (decision.node, decision.replicas) == ("b", 2)


def test_scale_down_never_goes_below_one_replica_even_with_min_zero():
    s = state(spec(min=0, down=0), idle("a", 0.0))  # keep_alive FOREVER: only load counts
    assert run(s, [0, 60, 1e6]) == [None, None, None]


def test_scale_down_with_min_zero_stops_at_one():
    s = state(spec(min=0, down=0), idle("a", 0.0), idle("b", 5.0))
    (decision,) = decide([s], now=10.0)[0]
    assert (decision.op, decision.node, decision.replicas) == ("scale_down", "a", 1)
    s = replace(s, placements=(idle("b", 5.0),))
    assert run(s, [20.0, 1e6]) == [None, None]


def test_scale_down_never_goes_below_replicas_min():
    s = state(spec(min=2, down=0), idle("a", 0.0), idle("b", 0.0))
    assert run(s, [0, 1e6]) == [None, None]
    more = state(spec(min=2, down=0), idle("a", 0.0), idle("b", 0.0), idle("c", 0.0))
    (decision,) = decide([more], now=1.0)[0]
    assert decision.replicas == 2


def test_a_downscale_delay_of_minus_one_never_scales_down():
    s = state(spec(down=-1), idle("a", 0.0), idle("b", 0.0))
    assert run(s, [0, 3600, 1e9]) == [None, None, None]


def test_scale_down_timer_resets_when_the_load_rises():
    s = state(spec(target=2, down=60), busy("a", 1), busy("b", 1))
    _, s = step(s, 0.0)
    assert s.timers.below_since == 0.0
    s = replace(s, placements=(busy("a", 2), busy("b", 1)))  # 3 need both replicas
    _, s = step(s, 30.0)
    assert s.timers == Timers()
    s = replace(s, placements=(busy("a", 1), busy("b", 1)))
    decision, s = step(s, 61.0)
    assert decision is None and s.timers.below_since == 61.0


# --- keep-alive ---------------------------------------------------------------------


def test_an_idle_placement_expires_after_its_keep_alive():
    s = state(spec(min=0), idle("a", 100.0, keep_alive=300))
    assert run(s, [399.9]) == [None]
    (decision,) = decide([s], now=400.0)[0]
    assert (decision.op, decision.model, decision.node, decision.replicas) == (
        "expire",
        M1,
        "a",
        0,
    )
    assert decision.reason == "idle for 5m (keep_alive 5m)"


def test_an_expiry_reason_gives_the_idle_time_and_the_keep_alive():
    s = state(spec(min=0), idle("a", 0.0, keep_alive=90))
    (decision,) = decide([s], now=125.0)[0]
    assert decision.reason == "idle for 2m5s (keep_alive 1m30s)"
    assert decision.describe() == "expire m1:1b on a to 0: idle for 2m5s (keep_alive 1m30s)"


def test_keep_alive_zero_expires_as_soon_as_the_placement_is_idle():
    s = state(spec(min=0), idle("a", 50.0, keep_alive=0))
    (decision,) = decide([s], now=50.0)[0]
    assert (decision.op, decision.replicas) == ("expire", 0)


def test_a_busy_placement_never_expires():
    s = state(spec(min=0, target=8), busy("a", 1, keep_alive=0))
    assert run(s, [0, 1e6]) == [None, None]


def test_keep_alive_forever_never_expires():
    s = state(spec(min=0), idle("a", 0.0, keep_alive=FOREVER))
    assert run(s, [0, 1e12]) == [None, None]


def test_keep_alive_is_the_placements_not_the_models():
    # The model says 5m; the last request asked for 10s.
    short = state(spec(min=0, keep_alive=300), idle("a", 0.0, keep_alive=10))
    (decision,) = decide([short], now=10.0)[0]
    assert decision.op == "expire"
    # The model says 0; the last request asked to stay forever.
    forever = state(spec(min=0, keep_alive=0), idle("a", 0.0, keep_alive=FOREVER))
    assert run(forever, [0, 1e9]) == [None, None]


def test_keep_alive_with_min_one_keeps_the_last_replica():
    s = state(spec(min=1), idle("a", 0.0, keep_alive=10))
    assert run(s, [10, 1e6]) == [None, None]


def test_keep_alive_with_min_one_shrinks_a_placement_to_one():
    s = state(spec(min=1), idle("a", 0.0, replicas=3, keep_alive=10))
    (decision,) = decide([s], now=20.0)[0]
    assert (decision.op, decision.node, decision.replicas) == ("expire", "a", 1)


def test_keep_alive_with_min_one_removes_placements_down_to_one():
    s = state(
        spec(min=1),
        idle("a", 0.0, keep_alive=100),  # expires at 100
        idle("b", 50.0, keep_alive=10),  # expires at 60: first
    )
    (decision,) = decide([s], now=200.0)[0]
    assert (decision.op, decision.node, decision.replicas) == ("expire", "b", 1)
    s = replace(s, placements=(idle("a", 0.0, keep_alive=100),))  # b removed
    assert run(s, [200.0, 1e6]) == [None, None]


def test_keep_alive_with_min_zero_removes_every_placement_one_call_at_a_time():
    s = state(spec(min=0), idle("a", 0.0, keep_alive=10), idle("b", 5.0, keep_alive=10))
    (first,) = decide([s], now=100.0)[0]
    assert (first.node, first.replicas) == ("a", 1)
    s = replace(s, placements=(idle("b", 5.0, keep_alive=10),))
    (second,) = decide([s], now=100.0)[0]
    assert (second.op, second.node, second.replicas) == ("expire", "b", 0)


def test_an_expiry_of_a_tie_goes_to_the_first_node_by_name():
    s = state(spec(min=0), idle("b", 0.0, keep_alive=10), idle("a", 0.0, keep_alive=10))
    (decision,) = decide([s], now=10.0)[0]
    assert decision.node == "a"


def test_an_expiry_goes_before_scaling_and_starts_the_timers_afresh():
    s = state(
        spec(min=0, target=1, up=0),
        busy("a", 5),
        idle("b", 0.0, keep_alive=10),
        timers=Timers(above_since=0.0),
    )
    decisions, timers = decide([s], now=10.0)
    assert [(d.op, d.node) for d in decisions] == [("expire", "b")]
    assert timers == {M1: Timers()}


def test_an_unexpired_idle_placement_leaves_scaling_alone():
    s = state(spec(min=0, target=1, up=0, max=3), busy("a", 5), idle("b", 0.0, keep_alive=100))
    (decision,) = decide([s], now=10.0)[0]
    assert (decision.op, decision.replicas) == ("scale_up", 3)


# --- several models -----------------------------------------------------------------


def test_decide_gives_each_model_its_own_decision_and_timers():
    m2, m3 = "m2:7b", "m3:1b"
    up = state(spec(up=0), busy("a", 9))
    expire = state(spec(m2, min=0), idle("a", 0.0, model=m2, keep_alive=5))
    waiting = state(spec(m3, up=5), busy("b", 9, model=m3))
    quiet = state(spec("m4:1b"))
    decisions, timers = decide([up, expire, waiting, quiet], now=10.0)
    assert [(d.model, d.op) for d in decisions] == [(M1, "scale_up"), (m2, "expire")]
    assert timers == {
        M1: Timers(),
        m2: Timers(),
        m3: Timers(above_since=10.0),
        "m4:1b": Timers(),
    }


def test_the_target_is_per_slot_a_replica_with_four_slots_carries_four_times_as_many():
    s = spec(target=2, up=5)
    assert run(state(s, busy("a", 8, slots=4)), [0, 10]) == [None, None]  # 2 per slot
    decisions = run(state(s, busy("a", 9, slots=4)), [0, 10])
    assert decisions[0] is None and decisions[1].op == "scale_up"
    assert "target 8 per replica" in decisions[1].reason
