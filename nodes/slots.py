"""The batching engine's choices, as pure functions over plain data.

A replica's llama.cpp context holds ``parallel`` sequences ("slots") in one KV
cache of ``n_ctx`` cells that they share (llama.cpp's unified cache). Each step
of the engine decodes one batch: the next token of every slot that generates,
plus a chunk of the prompt of slots that are still reading theirs. Three
choices are made here, where tests can reach them without a model:

* ``choose_slot``: which free slot a new request takes. The one whose cached
  tokens share the longest prefix with its prompt (the previous turn of the same
  conversation, or the same system prompt), so only the rest is evaluated; among
  equals, the one used longest ago, so the caches of recent conversations last.
* ``plan_step``: how many tokens each busy slot adds to the next batch. Every
  generating slot adds one. Prompts take the rest of the batch in arrival order;
  while any slot generates, at most ``busy_chunk`` prompt tokens go into a step,
  so a long new prompt delays running streams by one short step at a time.
* ``make_room``: what to drop when the next batch needs more cells than are
  free. First the cached tokens of idle slots (least recently used first), then
  prompt tokens of this step (they wait for the next), and only then a running
  request: the one admitted last gives its cells back and waits at the head of
  the queue, to be evaluated again when room returns (it keeps what it generated).
  One request always fits alone, since no prompt may exceed the context.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

# Prompt tokens a step takes while other slots generate: on a 2-core box about 0.4 s of
# prefill for the starter model, the longest pause a running stream sees.
BUSY_CHUNK = 128


@dataclass(frozen=True, slots=True)
class FreeSlot:
    """A slot without a request: what its sequence holds and when it was last used."""

    index: int
    cached: Sequence[int]
    last_used: float


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    """How many leading tokens ``a`` and ``b`` share."""
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def choose_slot(free: Sequence[FreeSlot], prompt: Sequence[int]) -> tuple[int, int]:
    """(the slot for ``prompt``, how many of its cached tokens it keeps).

    At most ``len(prompt) - 1`` are kept: the last prompt token is evaluated again,
    because its logits give the first generated token."""
    if not free:
        raise ValueError("no free slot")
    best = min(free, key=lambda s: (-common_prefix(s.cached, prompt), s.last_used, s.index))
    return best.index, min(common_prefix(best.cached, prompt), max(0, len(prompt) - 1))


@dataclass(frozen=True, slots=True)
class Busy:
    """A slot with a request, as the step planner sees it."""

    index: int
    to_read: int  # prompt tokens not yet evaluated (0: it generates)
    admitted: int  # order of admission (lower: earlier)
    held: int  # cells its sequence holds now


@dataclass(frozen=True, slots=True)
class Step:
    """Tokens each slot adds to the next batch, and what ``make_room`` dropped."""

    tokens: Mapping[int, int]  # slot -> tokens this step (1 for a generating slot)
    drop_idle: tuple[int, ...] = ()  # idle slots whose cached tokens go
    preempt: tuple[int, ...] = ()  # running slots sent back to the queue

    @property
    def size(self) -> int:
        return sum(self.tokens.values())


def plan_step(busy: Sequence[Busy], n_batch: int, busy_chunk: int = BUSY_CHUNK) -> dict[int, int]:
    """Tokens each busy slot adds to the next batch (slots adding none are left out)."""
    plan: dict[int, int] = {}
    generating = [b for b in busy if b.to_read == 0]
    for b in generating:
        plan[b.index] = 1
    budget = n_batch - len(plan)
    if generating:
        budget = min(budget, busy_chunk)
    for b in sorted((b for b in busy if b.to_read > 0), key=lambda b: b.admitted):
        if budget <= 0:
            break
        take = min(b.to_read, budget)
        plan[b.index] = take
        budget -= take
    return plan


def make_room(
    plan: Mapping[int, int],
    busy: Sequence[Busy],
    idle: Sequence[tuple[int, int, float]],
    n_ctx: int,
) -> Step:
    """Fit ``plan`` in the cache of ``n_ctx`` cells (see the module docstring).

    ``idle`` is (slot, cells held, last used) of every slot without a request."""
    tokens = dict(plan)
    used = sum(b.held for b in busy) + sum(held for _, held, _ in idle)
    over = used + sum(tokens.values()) - n_ctx
    drop: list[int] = []
    for index, held, _ in sorted(idle, key=lambda s: s[2]):
        if over <= 0:
            break
        if held:
            drop.append(index)
            over -= held
    reading = sorted((b for b in busy if b.to_read > 0), key=lambda b: -b.admitted)
    for b in reading:  # the latest prompts wait first
        if over <= 0:
            break
        cut = min(tokens.get(b.index, 0), over)
        if cut:
            tokens[b.index] -= cut
            over -= cut
            if not tokens[b.index]:
                del tokens[b.index]
    preempt: list[int] = []
    for b in sorted(busy, key=lambda b: -b.admitted):
        if over <= 0 or len(preempt) == len(busy) - 1:
            break
        preempt.append(b.index)
        over -= b.held + tokens.pop(b.index, 0)
    return Step(tokens=tokens, drop_idle=tuple(drop), preempt=tuple(preempt))
