"""Prompts moved out of the KV cache into RAM, to be put back when a request needs them.

A replica's slots keep what they last evaluated, so the next turn of a conversation
reads only what is new. But there are only ``parallel`` slots: once more
conversations (or Open WebUI's title, tags and follow-up requests) have passed
through a replica, a slot's prefix is overwritten and the next turn reads its whole
history again. Before a slot's cached tokens are overwritten, the engine copies
that sequence's state (its KV cells) here; a later request whose prompt shares more
with a saved entry than with any free slot gets the entry copied back into its slot
instead of evaluating it again (llama-server does the same with its ``--cache-ram``).

The entries live in RAM rather than as idle sequences in the KV cache itself,
because every cell in use widens the attention of every decode step: idle
conversations left in the cache would slow down the running ones.

The cache is sized in tokens (cells): by default a quarter of the replica's
context, so it takes at most a quarter of its KV cache's memory, in RAM, and the
estimate counts it so (``nodes/gguf.py``). This module is the bookkeeping alone
(which entry, what to forget), over opaque data; ``nodes/batching.py`` does the
copying.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

from nodes.slots import common_prefix

# An entry is worth putting back only if the prompt uses at least this share of it:
# copying a long conversation back to reuse its first lines costs more than it saves.
MIN_SHARE = 0.25
# Sequences shorter than this are not worth saving (a template's header, a short probe).
MIN_TOKENS = 16
# An entry must give at least this many tokens more than the free slot already holds.
MIN_GAIN = 8


@dataclass(frozen=True, slots=True)
class Saved:
    """One sequence's state as llama.cpp wrote it, and the tokens it holds."""

    tokens: tuple[int, ...]
    data: object  # llama.cpp's state (a ctypes buffer); opaque here
    size: int  # its bytes


class PromptCache:
    """Saved sequences of ``limit`` tokens in all; the least recently used go first.

    An entry copied back into a slot stays here: the request may use only its start
    (the shared system prompt of another conversation), and the rest is still worth
    keeping."""

    def __init__(self, limit: int) -> None:
        self.limit = max(0, limit)
        self._entries: OrderedDict[tuple[int, ...], Saved] = OrderedDict()
        self.tokens = 0  # tokens held, at most ``limit``
        self.bytes = 0  # the RAM they take
        self.counters = {"saved": 0, "restored": 0, "dropped": 0}

    def __len__(self) -> int:
        return len(self._entries)

    def worth_saving(self, tokens: Sequence[int]) -> bool:
        """Whether a sequence holding ``tokens`` belongs here: long enough, not longer
        than the whole cache, and not here already."""
        return MIN_TOKENS <= len(tokens) <= self.limit and tuple(tokens) not in self._entries

    def put(self, tokens: Sequence[int], data: object, size: int) -> bool:
        """Keep ``data`` (``size`` bytes) for ``tokens``; False if it does not belong (see
        ``worth_saving``). Entries that are a prefix of ``tokens`` go: this one gives all
        they would."""
        key = tuple(tokens)
        if not self.worth_saving(key):
            return False
        for old in [k for k in self._entries if len(k) <= len(key) and key[: len(k)] == k]:
            self._drop(old)
        while self._entries and self.tokens + len(key) > self.limit:
            self._drop(next(iter(self._entries)))
            self.counters["dropped"] += 1
        self._entries[key] = Saved(key, data, size)
        self.tokens += len(key)
        self.bytes += size
        self.counters["saved"] += 1
        return True

    def best(self, prompt: Sequence[int], have: int) -> tuple[Saved, int] | None:
        """The entry sharing the longest prefix with ``prompt``, if it shares at least
        ``MIN_GAIN`` tokens more than ``have`` (what a free slot gives already) and
        enough of itself to be worth copying back, with how many it shares; else None."""
        found: tuple[Saved, int] | None = None
        for entry in self._entries.values():
            shared = common_prefix(entry.tokens, prompt)
            if shared <= (found[1] if found else have + MIN_GAIN - 1):
                continue
            if shared < MIN_SHARE * len(entry.tokens):
                continue
            found = (entry, shared)
        return found

    def used(self, entry: Saved) -> None:
        """``entry`` was copied back into a slot: it is the most recently used now (if a
        later save has not replaced it meanwhile)."""
        if entry.tokens in self._entries:
            self._entries.move_to_end(entry.tokens)
        self.counters["restored"] += 1

    def _drop(self, key: tuple[int, ...]) -> None:
        entry = self._entries.pop(key)
        self.tokens -= len(key)
        self.bytes -= entry.size
