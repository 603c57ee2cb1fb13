"""The batching engine's pure choices: which slot, how much of each prompt per step,
what gives way when the cache is full."""

from __future__ import annotations

from nodes.slots import Busy, FreeSlot, choose_slot, common_prefix, make_room, plan_step


def test_common_prefix():
    assert common_prefix([1, 2, 3], [1, 2, 4]) == 2
    assert common_prefix([], [1]) == 0
    assert common_prefix([1, 2], [1, 2, 3]) == 2


def test_a_prompt_goes_to_the_slot_that_holds_its_longest_prefix():
    free = [
        FreeSlot(0, [1, 2, 9], last_used=1.0),
        FreeSlot(1, [1, 2, 3, 4, 5], last_used=5.0),
        FreeSlot(2, [], last_used=0.0),
    ]
    assert choose_slot(free, [1, 2, 3, 4, 5, 6, 7]) == (1, 5)


def test_without_a_shared_prefix_the_least_recently_used_slot_is_taken():
    free = [FreeSlot(0, [7, 7], last_used=3.0), FreeSlot(1, [8], last_used=1.0)]
    assert choose_slot(free, [1, 2, 3]) == (1, 0)


def test_the_last_prompt_token_is_always_read_again_for_its_logits():
    free = [FreeSlot(0, [1, 2, 3, 4], last_used=0.0)]
    assert choose_slot(free, [1, 2, 3]) == (0, 2)
    assert choose_slot(free, [1, 2, 3, 4]) == (0, 3)


def test_every_generating_slot_gets_a_token_and_prompts_share_the_rest_in_order():
    busy = [
        Busy(0, to_read=0, admitted=1, held=50),
        Busy(1, to_read=300, admitted=3, held=0),
        Busy(2, to_read=0, admitted=2, held=20),
        Busy(3, to_read=100, admitted=2, held=0),
    ]
    plan = plan_step(busy, n_batch=2048, busy_chunk=128)
    assert plan[0] == plan[2] == 1
    assert plan[3] == 100 and plan[1] == 28  # earlier prompt first; 128 prompt tokens in all


def test_with_nothing_generating_a_prompt_takes_the_whole_batch():
    plan = plan_step([Busy(0, to_read=5000, admitted=1, held=0)], n_batch=2048)
    assert plan == {0: 2048}


def test_room_comes_from_idle_caches_first_least_recent_first():
    busy = [Busy(0, to_read=0, admitted=1, held=100)]
    idle = [(1, 300, 5.0), (2, 300, 1.0)]
    step = make_room({0: 1}, busy, idle, n_ctx=512)
    assert step.drop_idle == (2,) and step.preempt == () and step.tokens == {0: 1}


def test_then_the_latest_prompt_waits_then_the_latest_request_is_preempted():
    busy = [
        Busy(0, to_read=0, admitted=1, held=200),
        Busy(1, to_read=0, admitted=2, held=200),
        Busy(2, to_read=200, admitted=3, held=100),
    ]
    step = make_room({0: 1, 1: 1, 2: 100}, busy, [], n_ctx=560)
    assert step.tokens == {0: 1, 1: 1, 2: 58} and step.preempt == ()
    step = make_room({0: 1, 1: 1, 2: 100}, busy, [], n_ctx=480)
    assert step.preempt == (2,) and step.tokens == {0: 1, 1: 1}


def test_the_first_request_is_never_preempted():
    busy = [Busy(0, to_read=0, admitted=1, held=600)]
    step = make_room({0: 1}, busy, [], n_ctx=512)
    assert step.preempt == () and step.tokens == {0: 1}
