"""The batching loop: one thread decodes every request of a replica together.

A replica's llama.cpp context holds ``parallel`` sequences (slots) in one KV
cache. ``Batcher`` owns that context on a thread of its own, the only thread
that computes with it (llama.cpp's OpenMP keeps a team of worker threads per
calling thread; one team keeps the cores busy, two would fight over them). Each
step it:

1. takes new requests into free slots (``slots.choose_slot``: the longest
   cached prefix, so turn N of a conversation does not read turns 1..N-1 again)
   and drops requests whose caller went away. A slot's cached tokens that a new
   request would overwrite are first saved to RAM (``nodes/prompt_cache.py``), and
   a saved sequence that shares more with the new prompt than any free slot is
   copied back into the slot instead of being evaluated again;
2. plans one batch (``slots.plan_step``): the next token of every generating
   slot plus chunks of prompts still being read, and makes room for it in the
   cache (``slots.make_room``);
3. runs one ``llama_decode`` and samples each slot's next token in C with the
   slot's own sampler chain (penalties, grammar, top-k/p, min-p, temperature,
   seed), in the same order as llama-cpp-python's ``Llama`` builds it.

Tokens go to each request's queue as ids; the request's own thread turns them
into text (``nodes/llamacpp.py``), so the loop does nothing per token that a
request could do itself. Embeddings run in the same context, between steps, in
a sequence kept for them.
"""

from __future__ import annotations

import ctypes
import logging
import math
import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from typing import Any

import llama_cpp

from nodes.engine import SamplingParams
from nodes.errors import InvalidRequest
from nodes.prompt_cache import PromptCache
from nodes.slots import Busy, FreeSlot, choose_slot, make_room, plan_step

log = logging.getLogger(__name__)

IDLE_WAIT = 0.5  # seconds the loop sleeps with nothing to do (a new request wakes it)


class EngineFailure(RuntimeError):
    """llama.cpp failed to decode a batch (not the request's fault)."""


@dataclass(frozen=True, slots=True)
class End:
    """The last item of a request's queue: why it ended, and when its phases did."""

    reason: str  # "stop" (end of generation token), "length", "cancelled"
    admitted: float  # perf_counter when it got a slot
    first: float  # ... when its first token was sampled (= admitted if none)


@dataclass(frozen=True, slots=True)
class ImageSpan:
    """Positions ``start``..``end`` of a prompt are an image, evaluated by ``evaluate``."""

    start: int
    end: int
    evaluate: Callable[[Any, int, int], None]  # (llama context, position, sequence)


@dataclass(eq=False)
class Job:
    """One generation as the loop runs it."""

    tokens: list[int]  # what its sequence must hold: the prompt, then decoded output
    params: SamplingParams
    limit: int  # tokens it may generate
    grammar: str | None
    cancel: threading.Event
    images: list[ImageSpan] = field(default_factory=list)
    resources: ExitStack = field(default_factory=ExitStack)  # freed when it ends
    out: queue.SimpleQueue = field(default_factory=queue.SimpleQueue)
    submitted: float = field(default_factory=time.perf_counter)
    halt: bool = False  # set by the reader: it saw a stop sequence, nothing more is wanted
    admitted: float = 0.0
    first: float = 0.0
    order: int = 0  # admission order
    sampler: Any = None
    next: int | None = None  # sampled, not yet decoded
    produced: int = 0

    @property
    def gone(self) -> bool:
        return self.halt or self.cancel.is_set()


@dataclass(eq=False)
class EmbedJob:
    inputs: list[list[int]]
    done: threading.Event = field(default_factory=threading.Event)
    vectors: list[list[float]] | None = None
    error: BaseException | None = None


@dataclass(eq=False)
class _Slot:
    index: int  # also its sequence id
    cached: list[int] = field(default_factory=list)  # tokens its sequence holds
    job: Job | None = None
    last_used: float = 0.0


class Batcher:
    """The loop of one context (see the module docstring). Thread-safe to submit to."""

    def __init__(
        self,
        model: Any,  # llama_model_p
        ctx: Any,  # llama_context_p
        *,
        n_ctx: int,
        n_batch: int,
        parallel: int,
        n_swa: int = 0,
        prompt_cache: int = 0,
        name: str = "engine",
    ) -> None:
        """``prompt_cache``: tokens of evicted prompts kept in RAM (0: none)."""
        self._model = model
        self._vocab = llama_cpp.llama_model_get_vocab(model)
        self._n_vocab = llama_cpp.llama_vocab_n_tokens(self._vocab)
        self._ctx = ctx
        self._mem = llama_cpp.llama_get_memory(ctx)
        self._n_ctx = n_ctx
        self._n_batch = n_batch
        self._n_swa = n_swa
        self._embed_seq = parallel  # the sequence embeddings use
        self._slots = [_Slot(i) for i in range(parallel)]
        self._waiting: deque[Job] = deque()
        self._embeds: deque[EmbedJob] = deque()
        self._inbox: queue.SimpleQueue[Job | EmbedJob | None] = queue.SimpleQueue()
        self._batch = llama_cpp.llama_batch_init(n_batch, 0, 1)
        self._admitted = 0
        self._saved = PromptCache(prompt_cache) if prompt_cache and self._mem else None
        # prompt tokens read from the request, and those found in a slot's cache instead
        self.counters = {"prompt_evaluated": 0, "prompt_reused": 0, "preempted": 0}
        self._closed = False
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    # -- from any thread ----------------------------------------------------------

    def submit(self, job: Job | EmbedJob) -> None:
        if self._closed:
            raise EngineFailure("the engine is closed")
        self._inbox.put(job)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive() and not self._closed

    def busy_slots(self) -> int:
        return sum(s.job is not None for s in self._slots)

    def close(self) -> None:
        """Stop the loop (requests still running end as cancelled) and wait for it."""
        if self._closed:
            return
        self._closed = True
        self._inbox.put(None)
        if threading.current_thread() is not self._thread:
            self._thread.join()
        llama_cpp.llama_batch_free(self._batch)

    # -- the loop -----------------------------------------------------------------

    def _run(self) -> None:
        try:
            while self._take(block=not self._running()):
                self._drop_gone()
                while self._embeds:
                    self._embed(self._embeds.popleft())
                self._admit()
                if any(s.job for s in self._slots):
                    self._step()
        except BaseException as exc:  # noqa: BLE001 - ends every request with the reason
            log.exception("the batching loop failed")
            self._fail_all(exc)
        finally:
            self._closed = True
            self._fail_all(EngineFailure("the engine closed"), cancelled=True)

    def _running(self) -> bool:
        return bool(self._waiting or self._embeds or any(s.job for s in self._slots))

    def _take(self, *, block: bool) -> bool:
        """Move submitted work to the queues; False once closed."""
        try:
            item = self._inbox.get(timeout=IDLE_WAIT) if block else self._inbox.get_nowait()
        except queue.Empty:
            return not self._closed
        while True:
            if item is None:
                return False
            if isinstance(item, EmbedJob):
                self._embeds.append(item)
            else:
                self._waiting.append(item)
            try:
                item = self._inbox.get_nowait()
            except queue.Empty:
                return True

    def _drop_gone(self) -> None:
        for job in [j for j in self._waiting if j.gone]:
            self._waiting.remove(job)
            self._finish(job, "cancelled")
        for slot in self._slots:
            if slot.job is not None and slot.job.gone:
                self._release(slot, "cancelled")

    def _admit(self) -> None:
        while self._waiting:
            free = [FreeSlot(s.index, s.cached, s.last_used) for s in self._slots if not s.job]
            if not free:
                return
            job = self._waiting.popleft()
            index, keep = choose_slot(free, job.tokens)
            slot = self._slots[index]
            keep = self._from_saved(slot, job, keep)
            keep = self._reusable(slot, job, keep)
            self._forget(slot, keep)
            self.counters["prompt_reused"] += keep
            if not job.admitted:
                job.admitted = time.perf_counter()
                try:
                    job.sampler = self._sampler(job)
                except Exception as exc:  # noqa: BLE001 - this request's own failure
                    job.resources.close()
                    job.out.put(exc)
                    continue
            slot.job = job
            self._admitted += 1
            job.order = self._admitted
            if job.limit <= 0:
                self._release(slot, "length")

    def _from_saved(self, slot: _Slot, job: Job, keep: int) -> int:
        """Before ``slot`` takes ``job``: copy back a saved sequence that shares more than
        ``keep`` tokens with its prompt, saving first what the slot held; else save what
        the slot is about to lose. How many tokens the slot now gives the prompt."""
        saved = self._saved
        if saved is None:
            return keep
        found = saved.best(job.tokens, keep)
        if found is None:
            if keep < len(slot.cached):
                self._save(slot)
            return keep
        entry, shared = found
        saved.used(entry)
        self._save(slot)  # may push ``entry`` out of the cache; its data is still here
        restored = llama_cpp.llama_state_seq_set_data_ext(
            self._ctx, entry.data, entry.size, slot.index, 0
        )
        if restored != entry.size:  # no room for it now: evaluate the prompt instead
            log.info("a saved prompt could not be restored (%d tokens)", len(entry.tokens))
            llama_cpp.llama_memory_seq_rm(self._mem, slot.index, -1, -1)
            slot.cached.clear()
            return 0
        slot.cached[:] = entry.tokens
        return min(shared, max(0, len(job.tokens) - 1))

    def _save(self, slot: _Slot) -> None:
        """Copy ``slot``'s sequence to the prompt cache, if it is worth keeping."""
        assert self._saved is not None
        if not self._saved.worth_saving(slot.cached):
            return
        size = llama_cpp.llama_state_seq_get_size_ext(self._ctx, slot.index, 0)
        data = (ctypes.c_uint8 * size)()
        if llama_cpp.llama_state_seq_get_data_ext(self._ctx, data, size, slot.index, 0) == size:
            self._saved.put(slot.cached, data, size)

    @property
    def prompt_cache(self) -> PromptCache | None:
        """The prompts saved to RAM (None when off); read it on the loop's thread only,
        or for figures that may be a step old."""
        return self._saved

    def _reusable(self, slot: _Slot, job: Job, keep: int) -> int:
        """How much of ``keep`` the cache can really give back: never part of an image,
        and for sliding-window attention only what the window still holds."""
        for span in job.images:
            if span.start < keep < span.end:
                keep = span.start
        if keep and self._n_swa:
            pos_min = llama_cpp.llama_memory_seq_pos_min(self._mem, slot.index)
            if pos_min > 0 and keep < pos_min + self._n_swa:
                keep = 0
        return keep

    def _forget(self, slot: _Slot, keep: int = 0) -> None:
        """Drop slot's cached tokens from position ``keep`` on."""
        if keep < len(slot.cached) and self._mem:
            if not llama_cpp.llama_memory_seq_rm(self._mem, slot.index, keep, -1):
                llama_cpp.llama_memory_seq_rm(self._mem, slot.index, 0, -1)
                keep = 0
            del slot.cached[keep:]

    def _step(self) -> None:
        busy = []
        for slot in self._slots:
            job = slot.job
            if job is None:
                continue
            self._read_images(slot, job)
            busy.append(Busy(slot.index, self._readable(slot, job), job.order, len(slot.cached)))
        plan = plan_step(busy, self._n_batch)
        idle = [(s.index, len(s.cached), s.last_used) for s in self._slots if not s.job]
        step = make_room(plan, busy, idle, self._n_ctx)
        for index in step.drop_idle:
            self._forget(self._slots[index])
        for index in step.preempt:
            self._preempt(self._slots[index])
        if not step.tokens:
            return
        outputs = self._fill(step.tokens)
        status = llama_cpp.llama_decode(self._ctx, self._batch)
        if status == 1 and len(busy) > 1:  # no room in the cache after all: try with less
            latest = max(busy, key=lambda b: b.admitted)
            self._preempt(self._slots[latest.index])
            return
        if status != 0:
            for index in step.tokens:
                self._fail(self._slots[index], EngineFailure(f"llama_decode failed ({status})"))
            return
        for index, n in step.tokens.items():
            slot = self._slots[index]
            job = slot.job
            assert job is not None
            if job.next is not None and len(slot.cached) == len(job.tokens):
                job.tokens.append(job.next)  # the token just decoded
                job.next = None
            else:
                self.counters["prompt_evaluated"] += n
            slot.cached.extend(job.tokens[len(slot.cached) : len(slot.cached) + n])
        for index, at in outputs.items():
            self._sample(self._slots[index], at)

    def _readable(self, slot: _Slot, job: Job) -> int:
        """Prompt tokens the slot may read now: up to the next image, if any."""
        held = len(slot.cached)
        end = len(job.tokens)
        for span in job.images:
            if span.start >= held:
                end = min(end, span.start)
        return end - held

    def _read_images(self, slot: _Slot, job: Job) -> None:
        """Evaluate the image the slot's prompt has reached (in a decode of its own)."""
        for span in job.images:
            if span.start == len(slot.cached):
                span.evaluate(self._ctx, span.start, slot.index)
                slot.cached.extend(job.tokens[span.start : span.end])

    def _fill(self, tokens: dict[int, int]) -> dict[int, int]:
        """Write the step's tokens into the batch; {slot: batch index of its logits}."""
        batch = self._batch
        outputs: dict[int, int] = {}
        i = 0
        for index, n in tokens.items():
            slot = self._slots[index]
            job = slot.job
            assert job is not None
            start = len(slot.cached)
            if job.next is not None and start == len(job.tokens):
                ids = [job.next]
                wants_logits = True
            else:
                ids = job.tokens[start : start + n]
                # the prompt's last token gives the first sample; a preempted request
                # that reads its output again already holds its next token
                wants_logits = start + n == len(job.tokens) and job.next is None
            for k, token in enumerate(ids):
                batch.token[i] = token
                batch.pos[i] = start + k
                batch.n_seq_id[i] = 1
                batch.seq_id[i][0] = index
                batch.logits[i] = False
                i += 1
            if wants_logits:
                batch.logits[i - 1] = True
                outputs[index] = i - 1
        batch.n_tokens = i
        return outputs

    def _sample(self, slot: _Slot, at: int) -> None:
        job = slot.job
        assert job is not None
        token = llama_cpp.llama_sampler_sample(job.sampler, self._ctx, at)
        now = time.perf_counter()
        if not job.first:
            job.first = now
        if llama_cpp.llama_vocab_is_eog(self._vocab, token):
            self._release(slot, "stop")
            return
        job.produced += 1
        job.out.put(token)
        if job.produced >= job.limit:  # the limit also keeps it inside its context
            self._release(slot, "length")
        else:
            job.next = token

    def _preempt(self, slot: _Slot) -> None:
        """Send the slot's request back to the head of the queue, its cells freed; it
        keeps its tokens (prompt and output so far) and sampler, and reads them again."""
        job = slot.job
        assert job is not None
        self._forget(slot)
        slot.job = None
        slot.last_used = time.perf_counter()
        self._waiting.appendleft(job)
        self.counters["preempted"] += 1
        log.info("cache full: a request waits for room (%d tokens)", len(job.tokens))

    def _release(self, slot: _Slot, reason: str) -> None:
        job = slot.job
        assert job is not None
        slot.job = None
        slot.last_used = time.perf_counter()
        self._finish(job, reason)

    def _finish(self, job: Job, reason: str) -> None:
        if job.sampler is not None:
            llama_cpp.llama_sampler_free(job.sampler)
            job.sampler = None
        job.resources.close()
        admitted = job.admitted or time.perf_counter()
        job.out.put(End(reason, admitted, job.first or admitted))

    def _fail(self, slot: _Slot, error: BaseException) -> None:
        job = slot.job
        assert job is not None
        self._forget(slot)
        slot.job = None
        if job.sampler is not None:
            llama_cpp.llama_sampler_free(job.sampler)
            job.sampler = None
        job.resources.close()
        job.out.put(error)

    def _fail_all(self, error: BaseException, *, cancelled: bool = False) -> None:
        for slot in self._slots:
            if slot.job is not None:
                if cancelled:
                    self._release(slot, "cancelled")
                else:
                    self._fail(slot, error)
        while self._waiting:
            job = self._waiting.popleft()
            if cancelled:
                self._finish(job, "cancelled")
            else:
                job.resources.close()
                job.out.put(error)
        while self._embeds:
            embed = self._embeds.popleft()
            embed.error = error
            embed.done.set()
        while True:
            try:
                item = self._inbox.get_nowait()
            except queue.Empty:
                break
            if isinstance(item, Job):
                item.resources.close()
                item.out.put(error)
            elif isinstance(item, EmbedJob):
                item.error = error
                item.done.set()

    # -- sampling -----------------------------------------------------------------

    def _sampler(self, job: Job) -> Any:
        """The request's sampler chain, as llama-cpp-python's ``Llama`` builds it."""
        p = job.params
        chain = llama_cpp.llama_sampler_chain_init(llama_cpp.llama_sampler_chain_default_params())

        def add(sampler: Any) -> None:
            llama_cpp.llama_sampler_chain_add(chain, sampler)

        add(
            llama_cpp.llama_sampler_init_penalties(
                self._n_vocab, 64, p.repeat_penalty, p.frequency_penalty, p.presence_penalty
            )
        )
        if job.grammar:
            grammar = llama_cpp.llama_sampler_init_grammar(
                self._vocab, job.grammar.encode("utf-8"), b"root"
            )
            if not grammar:
                llama_cpp.llama_sampler_free(chain)
                raise InvalidRequest("llama.cpp could not parse the output grammar.")
            add(grammar)
        seed = job.params.seed if job.params.seed is not None else _random_seed()
        seed &= 0xFFFFFFFF
        if p.temperature < 0:
            add(llama_cpp.llama_sampler_init_dist(seed))
        elif p.temperature == 0:
            add(llama_cpp.llama_sampler_init_greedy())
        else:
            add(llama_cpp.llama_sampler_init_top_k(p.top_k))
            add(llama_cpp.llama_sampler_init_typical(1.0, 1))
            add(llama_cpp.llama_sampler_init_top_p(p.top_p, 1))
            add(llama_cpp.llama_sampler_init_min_p(p.min_p, 1))
            add(llama_cpp.llama_sampler_init_temp(p.temperature))
            add(llama_cpp.llama_sampler_init_dist(seed))
        return chain

    # -- embeddings ---------------------------------------------------------------

    def _embed(self, job: EmbedJob) -> None:
        """Each input alone in the embeddings sequence, with embeddings on for it."""
        seq = self._embed_seq
        vectors = []
        try:
            for ids in job.inputs:
                self._room_for(len(ids))
                llama_cpp.llama_set_embeddings(self._ctx, True)
                try:
                    batch = self._batch
                    for k, token in enumerate(ids):
                        batch.token[k] = token
                        batch.pos[k] = k
                        batch.n_seq_id[k] = 1
                        batch.seq_id[k][0] = seq
                        batch.logits[k] = True
                    batch.n_tokens = len(ids)
                    status = llama_cpp.llama_decode(self._ctx, batch)
                    if status != 0:
                        raise EngineFailure(f"llama_decode failed for an embedding ({status})")
                    pooled = llama_cpp.llama_get_embeddings_seq(self._ctx, seq)
                    if not pooled:
                        raise EngineFailure("llama.cpp returned no pooled embedding")
                    n_embd = llama_cpp.llama_model_n_embd(self._model)
                    vectors.append(_normalised(pooled[:n_embd]))
                finally:
                    if self._mem:  # an encoder-only model keeps no cache
                        llama_cpp.llama_memory_seq_rm(self._mem, seq, 0, -1)
                    llama_cpp.llama_set_embeddings(self._ctx, False)
            job.vectors = vectors
        except BaseException as exc:  # noqa: BLE001 - handed to the caller
            job.error = exc
        finally:
            job.done.set()

    def _room_for(self, n: int) -> None:
        """Free ``n`` cells for an embedding: idle caches first, then running requests."""
        used = sum(len(s.cached) for s in self._slots)

        def order(s: _Slot) -> tuple[bool, float]:  # idle (least recent first), then newest
            return (s.job is not None, -s.job.order if s.job else s.last_used)

        for slot in sorted(self._slots, key=order):
            if used + n <= self._n_ctx:
                return
            used -= len(slot.cached)
            if slot.job is None:
                self._forget(slot)
            else:
                self._preempt(slot)


def _normalised(values: Sequence[float]) -> list[float]:
    norm = math.sqrt(sum(v * v for v in values)) or 1.0
    return [float(v) / norm for v in values]


def _random_seed() -> int:
    import secrets

    return secrets.randbits(32)
