"""A deterministic engine for routing, scaling and fault tests and overhead benchmarks.

It speaks the same protocol as ``LlamaCppEngine`` and honours the same
settings that matter to the layers above it (max_tokens, stop sequences,
context length, cancellation, ``parallel`` slots: that many generations run at
once, each at the set pace, as a batching engine's share one step time), but
its "model" is a word list: the same
prompt and seed always give the same words, at a set delay per token. Tools
and thinking are accepted and ignored: the words are always the answer. Images
are taken when the spec names a projector (each adds a word per 1,000 bytes to
the prompt), else refused as the real engine refuses them.

Options (``EngineSpec.options``):

* ``token_delay``: seconds per generated token (default 0.01);
* ``token_delay_by_node``: ``{node name: seconds}``, the token delay on those nodes
  (a simulated cluster's slow boxes); the node is the Ray node's ``corral.node`` label;
* ``prompt_delay``: seconds before the first token (default 0);
* ``reply_tokens``: tokens in a reply when max_tokens is not set (default 16);
* ``load_delay``: seconds the constructor sleeps, to simulate a cold start;
* ``fail_after``: raise ``EngineFault`` after this many tokens (fault tests).

Test-only fault injection, named so that nobody takes it for a feature:

* ``test_crash_on``: ``"generate"`` or ``"load"``: the replica's process kills itself with
  ``test_crash_signal`` (default ``SIGSEGV``) when a generation starts, or while the model
  loads, as llama.cpp does when a kernel faults (the AMX crash of issue 15).
"""

from __future__ import annotations

import hashlib
import math
import os
import random
import signal
import threading
import time
from collections.abc import Iterator, Sequence

from nodes.engine import (
    Embeddings,
    EngineInfo,
    EngineSpec,
    Finished,
    FinishReason,
    GenerateRequest,
    GenerationEvent,
    SamplingParams,
    StopMatcher,
    TextDelta,
    Timings,
    Usage,
    check_prompt_fits,
    max_new_tokens,
)
from nodes.errors import InvalidRequest

WORDS = (
    "alpha bravo charlie delta echo foxtrot golf hotel india juliet kilo lima "
    "mike november oscar papa quebec romeo sierra tango uniform victor whiskey"
).split()
EMBED_DIM = 16


class EngineFault(RuntimeError):
    """The failure ``fail_after`` injects: an engine breaking mid-generation."""


def _digest(*parts: object) -> int:
    data = "\x1f".join(map(str, parts)).encode()
    return int.from_bytes(hashlib.sha256(data).digest()[:8], "big")


def _node_name() -> str:
    """The Corral name of the Ray node this runs on ("" outside a Ray worker)."""
    import ray

    from nodes.agent import LABEL_NODE

    if not ray.is_initialized():
        return ""
    return ray.get_runtime_context().get_node_labels().get(LABEL_NODE, "")


def _crash(sig: signal.Signals) -> None:
    """Die by ``sig`` the way a native crash kills a process: no Python cleanup runs."""
    os.kill(os.getpid(), sig)
    time.sleep(60)  # a signal that does not kill (one the process handles): still no answer


class FakeEngine:
    """Deterministic words at a configurable pace; one token per word."""

    def __init__(self, spec: EngineSpec) -> None:
        self._spec = spec
        opts = spec.options
        self.token_delay = float(opts.get("token_delay", 0.01))
        by_node = opts.get("token_delay_by_node") or {}
        if by_node:
            self.token_delay = float(by_node.get(_node_name(), self.token_delay))
        self.prompt_delay = float(opts.get("prompt_delay", 0.0))
        self.reply_tokens = int(opts.get("reply_tokens", 16))
        fail_after = opts.get("fail_after")
        self.fail_after = None if fail_after is None else int(fail_after)
        load_delay = float(opts.get("load_delay", 0.0))
        self._crash_on = opts.get("test_crash_on")
        self._crash_signal = signal.Signals[str(opts.get("test_crash_signal", "SIGSEGV"))]
        time.sleep(load_delay)
        if self._crash_on == "load":
            _crash(self._crash_signal)
        self.info = EngineInfo(
            model=spec.model,
            n_ctx=spec.n_ctx,
            n_ctx_train=spec.n_ctx,
            n_embd=EMBED_DIM,
            load_seconds=load_delay,
            parallel=max(1, spec.parallel),
        )

    def encode(self, request: GenerateRequest) -> list[int]:
        if request.images and not self._spec.projector:  # as LlamaCppEngine refuses them
            raise InvalidRequest(
                f"{self._spec.model} takes text only; image inputs are not supported.",
                param="messages",
            )
        if request.messages is not None:
            # an image is one word per 1,000 bytes of it (a model's image tokens)
            text = "\n".join(
                f"{m.role}: {m.content}" + " image" * sum(1 + len(i) // 1000 for i in m.images)
                for m in request.messages
            )
            param = "messages"
        else:
            text = request.prompt or ""
            param = "prompt"
        tokens = [_digest(word) % 50_000 for word in text.split()]
        check_prompt_fits(len(tokens), request.params.context(self.info.n_ctx), param)
        return tokens

    def generate(
        self, tokens: list[int], params: SamplingParams, cancel: threading.Event
    ) -> Iterator[GenerationEvent]:
        wanted = self.reply_tokens
        if params.max_tokens is not None:
            wanted = min(wanted, params.max_tokens)
        limit = max_new_tokens(len(tokens), params.context(self.info.n_ctx), wanted)
        # A reply that runs to its own length "stopped"; one cut short by
        # max_tokens or by the context window hit the "length" limit.
        reason: FinishReason = "stop" if limit == self.reply_tokens else "length"
        rng = random.Random(_digest(tokens, params.seed))
        stops = StopMatcher(params.stop)
        if self._crash_on == "generate":
            _crash(self._crash_signal)
        started = time.perf_counter()
        cancel.wait(self.prompt_delay)
        first_at = time.perf_counter()
        produced = 0
        while produced < limit:
            if cancel.wait(self.token_delay):
                reason = "cancelled"
                break
            if produced == self.fail_after:
                raise EngineFault(f"injected fault after {produced} tokens")
            produced += 1
            text, stopped = stops.feed(("" if produced == 1 else " ") + rng.choice(WORDS))
            if text:
                yield TextDelta(text)
            if stopped:
                reason = "stop"
                break
        else:
            if tail := stops.flush():
                yield TextDelta(tail)
        ended = time.perf_counter()
        yield Finished(
            reason=reason,
            usage=Usage(prompt_tokens=len(tokens), completion_tokens=produced),
            stop_sequence=stops.matched,
            timings=Timings(prompt=first_at - started, generation=ended - first_at),
        )

    def embed(self, texts: Sequence[str]) -> Embeddings:
        vectors = []
        for text in texts:
            rng = random.Random(_digest("embed", text))
            v = [rng.uniform(-1, 1) for _ in range(EMBED_DIM)]
            norm = math.sqrt(sum(x * x for x in v)) or 1.0
            vectors.append([x / norm for x in v])
        return Embeddings(vectors=vectors, prompt_tokens=sum(len(t.split()) for t in texts))

    def close(self) -> None:
        pass
