"""Routing as pure choices: which placement of a model gets the next request."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from deployments import routing
from deployments.routing import (
    STRATEGIES,
    Candidate,
    Route,
    Router,
    conversation_of,
    follows,
    least_loaded,
    merge_load,
    retry_after,
    with_affinity,
)
from nodes.engine import ChatMessage, GenerateRequest

DRAWS = 400  # enough that a fair choice among a handful misses one with odds ~1e-70


def cand(app: str, load: int, replicas: int = 1, capacity: int = 64) -> Candidate:
    return Candidate(app=app, replicas=replicas, load=load, capacity=capacity)


def draws(choose, candidates, n: int = DRAWS) -> Counter:
    """How often each app was picked over ``n`` choices (None counted as None)."""
    picked = Counter()
    for _ in range(n):
        c = choose(candidates)
        picked[c.app if c is not None else None] += 1
    return picked


# --- Candidate and merge_load -------------------------------------------------------


@pytest.mark.parametrize(
    ("load", "capacity", "full"),
    [(0, 1, False), (63, 64, False), (64, 64, True), (70, 64, True), (0, 0, True)],
)
def test_a_candidate_is_full_at_its_capacity(load, capacity, full):
    assert cand("a", load, capacity=capacity).full is full


def test_merge_load_adds_other_ingresses_reports_to_the_exact_local_count():
    route = Route(
        app="m1-nodeA",
        node="nodeA",
        replicas=2,
        capacity=16,
        reported={"me": 5, "ingress-2": 2, "ingress-3": 1},
    )
    c = merge_load(route, local=3, origin="me")
    # Our own count is exact (3), not the replicas' possibly stale 5; others add 2 + 1.
    assert c == Candidate(app="m1-nodeA", replicas=2, load=6, capacity=16)


def test_merge_load_without_reports_is_the_local_count():
    route = Route(app="a", node="n", replicas=1, capacity=4)
    assert merge_load(route, local=2, origin="me").load == 2


def test_merge_load_when_only_this_ingress_reported_ignores_the_report():
    route = Route(app="a", node="n", replicas=1, capacity=4, reported={"me": 7})
    assert merge_load(route, local=0, origin="me").load == 0


def test_merge_load_counts_an_empty_origin_like_any_other():
    # A replica called without an origin reports under "": that is another sender.
    route = Route(app="a", node="n", replicas=1, capacity=4, reported={"": 2, "me": 1})
    assert merge_load(route, local=1, origin="me").load == 3


# --- least_loaded -------------------------------------------------------------------


def test_least_loaded_compares_requests_per_replica_not_totals():
    two_replicas = cand("two", load=3, replicas=2)  # 1.5 per replica
    one_replica = cand("one", load=2, replicas=1)  # 2 per replica
    rng = random.Random(0)
    for _ in range(50):
        assert least_loaded([one_replica, two_replicas], rng) is two_replicas


def test_least_loaded_picks_the_idle_placement():
    busy, idle = cand("busy", 4), cand("idle", 0)
    assert least_loaded([busy, idle], random.Random(1)) is idle


def test_least_loaded_breaks_ties_at_random_among_the_tied_only():
    # 1/3 and 2/6 per replica are the same exact load; 1/1 is worse.
    tied_a = cand("a", load=1, replicas=3)
    tied_b = cand("b", load=2, replicas=6)
    worse = cand("c", load=1, replicas=1)
    rng = random.Random(42)
    picked = draws(lambda cs: least_loaded(cs, rng), [worse, tied_a, tied_b])
    assert set(picked) == {"a", "b"}
    assert picked["c"] == 0
    assert min(picked["a"], picked["b"]) > DRAWS // 4  # both get a fair share


def test_least_loaded_is_deterministic_for_a_seed():
    cs = [cand(app, 1) for app in "abcd"]

    def picks(seed: int) -> list[str]:
        rng = random.Random(seed)
        return [least_loaded(cs, rng).app for _ in range(30)]

    assert picks(7) == picks(7)
    assert len(set(picks(7))) > 1  # and still a random choice among the tied


def test_least_loaded_skips_full_placements_even_when_they_hold_fewer():
    # "full" has the fewest requests per replica but is at its queue limit.
    full = cand("full", load=2, replicas=4, capacity=2)
    open_ = cand("open", load=5, replicas=1, capacity=8)
    rng = random.Random(3)
    assert draws(lambda cs: least_loaded(cs, rng), [full, open_]) == Counter({"open": DRAWS})


def test_least_loaded_with_every_placement_full_is_none():
    cs = [cand("a", 4, capacity=4), cand("b", 9, capacity=8)]
    assert least_loaded(cs, random.Random(0)) is None


def test_least_loaded_with_no_placement_is_none():
    assert least_loaded([], random.Random(0)) is None


def test_least_loaded_counts_a_placement_without_replicas_as_one():
    # A placement reported with 0 replicas must not divide by zero.
    empty = cand("empty", load=1, replicas=0)
    other = cand("other", load=3, replicas=2)  # 1.5 per replica
    assert least_loaded([empty, other], random.Random(0)) is empty


# --- Router -------------------------------------------------------------------------


def test_router_least_loaded_is_the_default_and_routes_by_load():
    router = Router(seed=0)
    assert router.strategy == "least_loaded"
    cs = [cand("one", 2, replicas=1), cand("two", 3, replicas=2)]
    assert draws(router.choose, cs, 50) == Counter(two=50)


def test_router_least_loaded_breaks_ties_at_random():
    router = Router("least_loaded", seed=5)
    cs = [cand("a", 1), cand("b", 1), cand("c", 1), cand("d", 2)]
    picked = draws(router.choose, cs)
    assert set(picked) == {"a", "b", "c"}
    assert picked["d"] == 0


def test_router_round_robin_cycles_through_the_open_ones_in_a_stable_order():
    router = Router("round_robin")
    cs = [cand("c", 0), cand("a", 50), cand("b", 3), cand("full", 4, capacity=4)]
    picks = [router.choose(cs).app for _ in range(9)]
    # Every open placement once per round, whatever its load, and the same order each
    # round; a full one never.
    rounds = [picks[0:3], picks[3:6], picks[6:9]]
    assert all(sorted(r) == ["a", "b", "c"] for r in rounds)
    assert rounds[0] == rounds[1] == rounds[2]


def test_router_round_robin_order_does_not_depend_on_the_candidates_order():
    one, other = Router("round_robin"), Router("round_robin")
    cs = [cand("a", 0), cand("b", 0), cand("c", 0)]
    shuffled = [cs[2], cs[0], cs[1]]
    assert [one.choose(cs).app for _ in range(6)] == [other.choose(shuffled).app for _ in range(6)]


def test_router_round_robin_with_every_placement_full_is_none():
    router = Router("round_robin")
    assert router.choose([cand("a", 1, capacity=1)]) is None
    assert router.choose([]) is None


def test_router_random_picks_only_open_placements_and_each_of_them():
    router = Router("random", seed=11)
    cs = [cand("a", 60), cand("b", 0), cand("c", 0, capacity=0), cand("d", 8, capacity=8)]
    picked = draws(router.choose, cs)
    assert set(picked) == {"a", "b"}  # load does not matter, fullness does
    assert min(picked.values()) > DRAWS // 4


def test_router_random_with_every_placement_full_is_none():
    router = Router("random", seed=0)
    assert router.choose([cand("a", 2, capacity=2)]) is None


def test_seeded_routers_choose_the_same():
    cs = [cand(app, 0) for app in "abcde"]
    for strategy in STRATEGIES:
        one, other = Router(strategy, seed=123), Router(strategy, seed=123)
        assert [one.choose(cs).app for _ in range(20)] == [other.choose(cs).app for _ in range(20)]


def test_an_unknown_strategy_is_refused_with_the_known_ones():
    with pytest.raises(ValueError, match="fastest") as err:
        Router("fastest")  # type: ignore[arg-type]
    for strategy in STRATEGIES:
        assert strategy in str(err.value)


# --- retry_after --------------------------------------------------------------------


def test_retry_after_is_the_time_for_one_slot_to_free_over_all_replicas():
    cs = [cand("a", 8, replicas=2, capacity=8), cand("b", 4, replicas=2, capacity=4)]
    assert retry_after(cs, seconds_per_request=20.0) == pytest.approx(5.0)


@pytest.mark.parametrize(
    ("replicas", "seconds"),
    [((1,), 0.2), ((4, 4), 3.0), ((), 0.5), ((0,), 0.0)],
)
def test_retry_after_is_at_least_a_second(replicas, seconds):
    cs = [cand(f"p{i}", 1, replicas=r, capacity=1) for i, r in enumerate(replicas)]
    assert retry_after(cs, seconds) == 1.0


def test_retry_after_without_replicas_divides_by_one():
    assert retry_after([], seconds_per_request=12.0) == 12.0


# --- prefix affinity -------------------------------------------------------------


def test_a_conversation_goes_back_to_its_placement_within_the_bound():
    a = Candidate("a", replicas=1, load=1, capacity=64)
    b = Candidate("b", replicas=1, load=3, capacity=64)
    c = Candidate("c", replicas=2, load=9, capacity=64)
    assert with_affinity([a, b], a, holder="b").app == "b"  # 2 more: still worth it
    assert with_affinity([a, c], a, holder="c").app == "a"  # 4.5 per replica: too busy
    assert with_affinity([a, b], a, holder=None).app == "a"
    assert with_affinity([a, b], a, holder="gone").app == "a"
    full = Candidate("b", replicas=1, load=64, capacity=64)
    assert with_affinity([a, full], a, holder="b").app == "a"


def test_every_turn_of_a_conversation_has_the_same_key_and_others_differ():
    system = ChatMessage("system", "You are terse.")
    turn1 = GenerateRequest(messages=(system, ChatMessage("user", "Hi")))
    turn2 = GenerateRequest(
        messages=(
            system,
            ChatMessage("user", "Hi"),
            ChatMessage("assistant", "Hello."),
            ChatMessage("user", "How are you?"),
        )
    )
    other = GenerateRequest(messages=(system, ChatMessage("user", "Bye")))
    assert conversation_of("m", turn1) == conversation_of("m", turn2)
    assert conversation_of("m", turn1) != conversation_of("m", other)
    assert conversation_of("m", turn1) != conversation_of("n", turn1)


def test_only_a_turn_after_an_answer_follows_itsconversation_of():
    """Two people who both open with "hi" are not one conversation worth queueing for:
    affinity starts once a turn has an answer before it."""
    system = ChatMessage("system", "You are terse.")
    hi = ChatMessage("user", "Hi")
    assert not follows(GenerateRequest(messages=(hi,)))
    assert not follows(GenerateRequest(messages=(system, hi)))
    assert not follows(GenerateRequest(prompt="Hi"))
    answered = (system, hi, ChatMessage("assistant", "Hello."), ChatMessage("user", "And?"))
    assert follows(GenerateRequest(messages=answered))


def test_the_routing_choice_is_the_strategy_then_the_affinity_bound():
    a, b = cand("a", 1), cand("b", 3)
    router = Router("least_loaded", seed=0)
    assert routing.choose(router, [a, b]).app == "a"
    assert routing.choose(router, [a, b], holder="b").app == "b"  # 2 more: still worth it
    assert routing.choose(router, [a, cand("b", 4)], holder="b").app == "a"
    assert routing.choose(router, [cand("a", 64), cand("b", 64)], holder="b") is None
