"""Eviction as pure choices: which idle placements go so that another model fits."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

from cluster.autoscale import ModelState, PlacementLoad
from cluster.eviction import Victim, candidates, choose
from cluster.spec import ModelSpec

GIB = 1 << 30
LOADING = "big:70b"


def spec(name: str, *, min: int = 0, max: int = 4, pinned: bool = False) -> ModelSpec:
    return ModelSpec(name=name, replicas={"min": min, "max": max}, pinned=pinned)


def idle(model: str, node: str, since: float, replicas: int = 1) -> PlacementLoad:
    return PlacementLoad(model, node, replicas, in_flight=0, idle_since=since)


def busy(model: str, node: str, in_flight: int = 1, replicas: int = 1) -> PlacementLoad:
    return PlacementLoad(model, node, replicas, in_flight, idle_since=None)


def model(s: ModelSpec, *placements: PlacementLoad) -> ModelState:
    return ModelState(s, tuple(placements))


def keys(victims: Sequence[Victim] | None) -> list[tuple[str, str, int]] | None:
    if victims is None:
        return None
    return [(v.model, v.node, v.replicas) for v in victims]


def fits_on(
    free: Mapping[str, int], need: int, size: Mapping[str, int]
) -> Callable[[Sequence[Victim]], bool]:
    """``fits``: some node has ``need`` bytes once the victims on it are gone; each
    replica of a model frees ``size[model]``. Records every call in ``.calls``."""
    calls: list[list[tuple[str, str]]] = []

    def fits(victims: Sequence[Victim]) -> bool:
        calls.append([v.key for v in victims])
        freed = {node: 0 for node in free}
        for v in victims:
            freed[v.node] += size[v.model] * v.replicas
        return any(free[node] + freed[node] >= need for node in free)

    fits.calls = calls  # type: ignore[attr-defined]
    return fits


def victim(model_: str, node: str, since: float, replicas: int = 1) -> Victim:
    return Victim(model_, node, replicas, since)


# --- candidates ---------------------------------------------------------------------


def test_candidates_are_idle_placements_least_recently_used_first():
    models = [
        model(spec("a:1b"), idle("a:1b", "n1", since=30.0)),
        model(spec("b:1b"), idle("b:1b", "n1", since=10.0), idle("b:1b", "n2", since=50.0)),
        model(spec("c:1b"), idle("c:1b", "n2", since=20.0)),
    ]
    assert keys(candidates(models, LOADING)) == [
        ("b:1b", "n1", 1),
        ("c:1b", "n2", 1),
        ("a:1b", "n1", 1),
        ("b:1b", "n2", 1),
    ]
    assert [v.idle_since for v in candidates(models, LOADING)] == [10.0, 20.0, 30.0, 50.0]


def test_candidates_of_the_same_age_are_ordered_by_model_then_node():
    models = [
        model(spec("b:1b"), idle("b:1b", "n2", 5.0), idle("b:1b", "n1", 5.0)),
        model(spec("a:1b"), idle("a:1b", "n3", 5.0)),
    ]
    assert [v.key for v in candidates(models, LOADING)] == [
        ("a:1b", "n3"),
        ("b:1b", "n1"),
        ("b:1b", "n2"),
    ]


def test_a_pinned_model_is_never_a_candidate():
    models = [
        model(spec("pinned:1b", pinned=True), idle("pinned:1b", "n1", since=0.0)),
        model(spec("other:1b"), idle("other:1b", "n1", since=100.0)),
    ]
    assert [v.model for v in candidates(models, LOADING)] == ["other:1b"]


def test_the_model_being_loaded_is_never_a_candidate():
    # Its own idle replica elsewhere must not go to make room for another of it.
    models = [
        model(spec(LOADING), idle(LOADING, "n1", since=0.0)),
        model(spec("other:1b"), idle("other:1b", "n2", since=100.0)),
    ]
    assert [v.model for v in candidates(models, LOADING)] == ["other:1b"]


def test_a_placement_serving_requests_is_never_a_candidate():
    models = [
        model(spec("a:1b"), busy("a:1b", "n1", in_flight=2)),
        # loading or just starting: not idle yet, though nothing is in flight
        model(spec("b:1b"), PlacementLoad("b:1b", "n1", 1, in_flight=0, idle_since=None)),
        model(spec("c:1b"), idle("c:1b", "n1", since=100.0)),
    ]
    assert [v.model for v in candidates(models, LOADING)] == ["c:1b"]


def test_replicas_a_model_needs_for_its_min_stay():
    # min 1 over two idle single-replica placements: the older one may go, the
    # more recently used one stays.
    models = [model(spec("a:1b", min=1), idle("a:1b", "n1", 10.0), idle("a:1b", "n2", 20.0))]
    assert keys(candidates(models, LOADING)) == [("a:1b", "n1", 1)]


def test_a_placement_gives_up_only_its_replicas_above_min():
    models = [model(spec("a:1b", min=1), idle("a:1b", "n1", 10.0, replicas=3))]
    (only,) = candidates(models, LOADING)
    assert (only.node, only.replicas) == ("n1", 2)


def test_a_model_at_its_min_gives_nothing():
    models = [model(spec("a:1b", min=2), idle("a:1b", "n1", 1.0), idle("a:1b", "n2", 2.0))]
    assert candidates(models, LOADING) == []


def test_busy_replicas_count_toward_min():
    # min 1 is met by the busy placement, so the idle one may go entirely.
    models = [model(spec("a:1b", min=1), busy("a:1b", "n1"), idle("a:1b", "n2", 5.0, replicas=2))]
    assert keys(candidates(models, LOADING)) == [("a:1b", "n2", 2)]


def test_a_model_with_min_zero_may_lose_every_idle_replica():
    models = [model(spec("a:1b"), idle("a:1b", "n1", 1.0, replicas=2), idle("a:1b", "n2", 2.0))]
    assert keys(candidates(models, LOADING)) == [("a:1b", "n1", 2), ("a:1b", "n2", 1)]


def test_no_models_no_candidates():
    assert candidates([], LOADING) == []
    assert candidates([model(spec("a:1b"))], LOADING) == []


def test_a_victim_describes_itself():
    assert victim("a:1b", "n1", since=100.0).describe(now=130.0) == "a:1b on n1 (idle for 30s)"
    assert (
        victim("a:1b", "n1", since=0.0, replicas=2).describe(now=3600.0)
        == "2 replicas of a:1b on n1 (idle for 1h)"
    )


# --- choose -------------------------------------------------------------------------


def test_choose_nothing_when_the_model_fits_already():
    fits = fits_on({"n1": 8 * GIB}, need=4 * GIB, size={"a:1b": GIB})
    assert choose([victim("a:1b", "n1", 0.0)], fits) == []
    assert fits.calls == [[]]  # and no victim was even tried


def test_choose_none_when_even_every_victim_is_not_enough():
    fits = fits_on({"n1": 0}, need=10 * GIB, size={"a:1b": 4 * GIB, "b:1b": 4 * GIB})
    ordered = [victim("a:1b", "n1", 0.0), victim("b:1b", "n1", 1.0)]
    assert choose(ordered, fits) is None


def test_choose_none_without_candidates_when_it_does_not_fit():
    fits = fits_on({"n1": 0}, need=GIB, size={})
    assert choose([], fits) is None


def test_choose_takes_victims_in_lru_order_until_it_fits():
    size = {"a:1b": 4 * GIB, "b:1b": 4 * GIB, "c:1b": 4 * GIB}
    fits = fits_on({"n1": 1 * GIB}, need=8 * GIB, size=size)
    ordered = [victim("a:1b", "n1", 0.0), victim("b:1b", "n1", 1.0), victim("c:1b", "n1", 2.0)]
    chosen = choose(ordered, fits)
    assert keys(chosen) == [("a:1b", "n1", 1), ("b:1b", "n1", 1)]  # c stays: not needed
    assert all(any(c is o for o in ordered) for c in chosen)  # the given victims themselves


def test_choose_keeps_a_victim_on_a_node_that_cannot_help():
    # "old" is the least recently used, but it runs on n2, which cannot take the model
    # even empty; freeing n1 alone is what makes room.
    size = {"old:1b": 2 * GIB, "new:1b": 6 * GIB}
    fits = fits_on({"n1": 4 * GIB, "n2": 0}, need=8 * GIB, size=size)
    ordered = [victim("old:1b", "n2", 0.0), victim("new:1b", "n1", 5.0)]
    assert keys(choose(ordered, fits)) == [("new:1b", "n1", 1)]


def test_choose_drops_an_unneeded_victim_from_the_middle():
    size = {"a:1b": 4 * GIB, "b:1b": 4 * GIB, "c:1b": 4 * GIB}
    fits = fits_on({"n1": 0, "n2": 0}, need=8 * GIB, size=size)
    ordered = [victim("a:1b", "n1", 0.0), victim("b:1b", "n2", 1.0), victim("c:1b", "n1", 2.0)]
    assert keys(choose(ordered, fits)) == [("a:1b", "n1", 1), ("c:1b", "n1", 1)]


def test_choose_drops_the_more_recently_used_of_two_unneeded_victims_first():
    # After a, b, c are taken, either a or b is unneeded (each frees 4 GiB on n1, and
    # with c 4 GiB is enough); the one tried first is dropped: b, the more recent.
    def fits(victims: Sequence[Victim]) -> bool:
        freed_on_n1 = 4 * GIB * sum(v.node == "n1" for v in victims)
        return any(v.model == "c:1b" for v in victims) and freed_on_n1 >= 4 * GIB

    ordered = [victim("a:1b", "n1", 0.0), victim("b:1b", "n1", 1.0), victim("c:1b", "n2", 2.0)]
    assert keys(choose(ordered, fits)) == [("a:1b", "n1", 1), ("c:1b", "n2", 1)]


def test_choose_counts_the_replicas_a_victim_frees():
    size = {"a:1b": 2 * GIB, "b:1b": 2 * GIB}
    fits = fits_on({"n1": 0}, need=6 * GIB, size=size)
    ordered = [victim("a:1b", "n1", 0.0, replicas=3), victim("b:1b", "n1", 1.0)]
    assert keys(choose(ordered, fits)) == [("a:1b", "n1", 3)]


def test_candidates_then_choose_make_room_with_the_least_recently_used():
    models = [
        model(spec("pinned:1b", pinned=True), idle("pinned:1b", "n1", since=0.0)),
        model(spec("old:1b"), idle("old:1b", "n1", since=10.0)),
        model(spec("busy:1b"), busy("busy:1b", "n1")),
        model(spec("mid:1b"), idle("mid:1b", "n1", since=20.0)),
        model(spec("new:1b"), idle("new:1b", "n1", since=30.0)),
    ]
    size = {"old:1b": 3 * GIB, "mid:1b": 3 * GIB, "new:1b": 3 * GIB}
    fits = fits_on({"n1": 2 * GIB}, need=8 * GIB, size=size)
    chosen = choose(candidates(models, LOADING), fits)
    assert [v.model for v in chosen] == ["old:1b", "mid:1b"]
