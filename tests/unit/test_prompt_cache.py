"""The prompt cache's bookkeeping: which saved sequence a prompt gets back, and what
goes when it is full (the copying itself is tested on the real engine, in
test_batching.py)."""

from __future__ import annotations

from nodes.prompt_cache import MIN_GAIN, MIN_TOKENS, PromptCache

SYSTEM = list(range(100, 140))  # a 40-token system prompt every conversation shares


def conversation(n: int, length: int = 30) -> list[int]:
    return SYSTEM + [1000 * n + i for i in range(length)]


def test_a_prompt_gets_back_the_entry_sharing_the_most_with_it():
    cache = PromptCache(10_000)
    for n in range(3):
        assert cache.put(conversation(n), data=f"state {n}", size=100)
    prompt = conversation(1) + [7, 8, 9]  # the next turn of conversation 1
    entry, shared = cache.best(prompt, have=len(SYSTEM))
    assert entry.data == "state 1" and shared == len(conversation(1))


def test_an_entry_must_give_more_than_the_free_slot_already_holds():
    cache = PromptCache(10_000)
    cache.put(conversation(1), data="a", size=1)
    prompt = conversation(1)[: len(SYSTEM) + MIN_GAIN - 1] + [5]
    assert cache.best(prompt, have=len(SYSTEM)) is None, "fewer than MIN_GAIN tokens more"
    assert cache.best(conversation(1), have=len(conversation(1))) is None
    assert cache.best(conversation(1), have=0) is not None


def test_a_long_entry_is_not_copied_back_for_a_small_part_of_it():
    cache = PromptCache(10_000)
    long = SYSTEM + list(range(5000, 5400))  # 440 tokens
    cache.put(long, data="long", size=1)
    # shares the 40-token system prompt: less than a quarter of the entry
    assert cache.best(SYSTEM + [1, 2, 3], have=0) is None
    assert cache.best(long[:200], have=0)[1] == 200


def test_short_sequences_and_copies_are_not_saved():
    cache = PromptCache(10_000)
    assert not cache.put(list(range(MIN_TOKENS - 1)), data="x", size=1)
    assert cache.put(conversation(1), data="x", size=1)
    assert not cache.worth_saving(conversation(1)), "the same tokens are held"
    assert len(cache) == 1


def test_a_longer_turn_replaces_the_entry_it_extends():
    cache = PromptCache(10_000)
    cache.put(conversation(1), data="turn 1", size=10)
    cache.put(conversation(1) + [1, 2, 3, 4], data="turn 2", size=14)
    assert len(cache) == 1 and cache.tokens == len(conversation(1)) + 4 and cache.bytes == 14
    assert cache.best(conversation(1), have=0)[0].data == "turn 2"


def test_the_least_recently_used_entries_go_when_it_is_full():
    length = len(conversation(0))
    cache = PromptCache(3 * length)
    for n in range(3):
        cache.put(conversation(n), data=n, size=1)
    entry, _ = cache.best(conversation(0), have=0)
    cache.used(entry)  # conversation 0 came back: now the most recent
    cache.put(conversation(3), data=3, size=1)  # one must go: conversation 1
    held = {cache.best(conversation(n), have=0)[0].data for n in (0, 2, 3)}
    assert held == {0, 2, 3}
    assert cache.best(conversation(1), have=len(SYSTEM)) is None
    assert cache.tokens <= cache.limit
    assert cache.counters == {"saved": 4, "restored": 1, "dropped": 1}


def test_nothing_longer_than_the_whole_cache_is_kept():
    cache = PromptCache(50)
    assert not cache.put(list(range(51)), data="x", size=1)
    assert PromptCache(0).put(conversation(1), data="x", size=1) is False
