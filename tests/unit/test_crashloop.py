"""When a crashing placement is given up on (``cluster/crashloop.py``): pure, no clock."""

from __future__ import annotations

import pytest

from cluster.crashloop import (
    BACKOFF_FIRST,
    BACKOFF_MAX,
    CRASH_WINDOW,
    FORGIVE_AFTER,
    CrashBook,
    add,
    backoff,
    crash_looping,
    fail,
    failure_reason,
    recent,
)
from nodes.crashes import ProcessDeath

SEGV = "SIGSEGV (Segmentation fault) in generate (llamacpp.py:190)"


def caller(at: float, pid: int | None = None) -> ProcessDeath:
    return ProcessDeath(pid, at, "its process died", "caller")


def note(at: float, pid: int) -> ProcessDeath:
    return ProcessDeath(pid, at, SEGV, "note")


def test_a_death_told_by_its_note_and_by_a_caller_counts_once():
    # The caller sees it first (no pid), the next process reads the note 3 s later.
    deaths = add([], caller(100.4))
    deaths = add(deaths, note(100.0, pid=7))
    assert deaths == [ProcessDeath(7, 100.0, SEGV, "note")]
    # The same pid told twice, and a nameless report of another death later.
    deaths = add(deaths, note(100.0, pid=7))
    deaths = add(deaths, caller(110.0))
    assert [(d.pid, d.at, d.source) for d in deaths] == [
        (7, 100.0, "note"),
        (None, 110.0, "caller"),
    ]
    # Two callers at once are two deaths (two replicas), two notes of other pids too.
    assert len(add([caller(1.0)], caller(1.5))) == 2
    assert len(add([note(1.0, 1)], note(1.0, 2))) == 2


@pytest.mark.parametrize(
    ("times", "looping"),
    [
        ([], False),
        ([0, 10], False),
        ([0, 10, 20], True),
        ([0, 10, CRASH_WINDOW + 1], False),  # the first fell out of the window
        ([-500, -400, 30, 40, 50], True),
    ],
)
def test_three_deaths_within_a_minute_is_a_crash_loop(times, looping):
    now = max(times, default=0) + 0.5
    deaths = [caller(t) for t in times]
    assert crash_looping(deaths, now) is looping


def test_back_off_doubles_up_to_its_cap_and_a_retry_that_fails_adds_one():
    assert [backoff(n) for n in (1, 2, 3)] == [BACKOFF_FIRST, 2 * BACKOFF_FIRST, 4 * BACKOFF_FIRST]
    assert backoff(30) == BACKOFF_MAX
    first = fail(None, "m", "nas", "why", now=1000.0)
    assert (first.attempts, first.retry_at) == (1, 1000.0 + BACKOFF_FIRST)
    assert first.blocks(1000.0 + BACKOFF_FIRST - 1) and not first.blocks(first.retry_at)
    again = fail(first, "m", "nas", "why", now=2000.0)
    assert (again.attempts, again.retry_at) == (2, 2000.0 + 2 * BACKOFF_FIRST)


def test_the_reason_says_how_often_how_fast_and_the_last_signal():
    deaths = recent([caller(10.0), note(14.0, 3), caller(22.0)], now=23.0)
    assert (
        failure_reason(deaths, "nas") == f"its process on nas crashed 3 times in 12s; last: {SEGV}"
    )
    assert failure_reason([caller(5.0)], "nas") == (
        "its process on nas crashed once; last: its process died"
    )


def test_the_crash_book_fails_a_model_after_the_limit_and_retries_it_once_per_backoff():
    book = CrashBook()
    for at in (100.0, 110.0):
        book.died("app-a", caller(at), now=at)
    assert book.reason("app-a", "nas", now=111.0) is None
    assert "crashed twice in 10s" in book.reason("app-a", "nas", now=111.0, at_least=2)
    book.died("app-a", caller(120.0), now=120.0)
    why = book.reason("app-a", "nas", now=121.0)
    assert why is not None and "nas" in why
    failure = book.fail("a:1", "nas", why, now=121.0)
    assert book.blocking("a:1", now=122.0) == failure
    assert book.blocking("a:1", now=121.0 + BACKOFF_FIRST) is None
    # Its back-off ran out: a declared model is retried once, an undeclared one is not.
    later = 121.0 + BACKOFF_FIRST
    assert book.due(later, running=lambda m: False, declared={"a:1"}) == ["a:1"]
    assert book.due(later + 1, running=lambda m: False, declared={"a:1"}) == []
    assert book.due(later, running=lambda m: False, declared=set()) == []


def test_the_crash_book_forgives_a_model_that_served_well_since_its_retry():
    book = CrashBook()
    book.fail("a:1", "nas", "crashed", now=0.0)
    book.loaded("a:1", now=100.0)  # it loaded after its back-off: on probation
    assert book.due(100.0 + FORGIVE_AFTER, running=lambda m: True, declared=set()) == []
    assert "a:1" in book.failed
    book.due(101.0 + FORGIVE_AFTER, running=lambda m: True, declared=set())
    assert "a:1" not in book.failed
    book.fail("b:1", "nas", "crashed", now=0.0)
    book.clear("b:1")  # corral apply / corral stop: at once, from the start
    assert book.blocking("b:1", now=1.0) is None
