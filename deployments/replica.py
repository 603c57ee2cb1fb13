"""One Serve deployment per placement: an engine behind an ordered queue.

llama.cpp's context holds a single sequence, so a replica runs one generation
at a time. Work goes to a one-thread executor: its queue is the replica's
queue (first come, first served), and no request can cancel or corrupt
another. A caller that goes away sets its cancel flag; the engine stops at the
next token, or skips the work entirely if it was still waiting.

Tokens reach the caller in batches: whatever the engine produced since the
caller last read. At one token per read this is a plain stream; when the caller
falls behind (a busy box, a slow network) it catches up in fewer, larger
messages instead of paying Ray's per-message cost for every token.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import AsyncIterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from typing import Any

from ray import serve
from ray.serve.deployment import Application

from nodes.engine import (
    Embeddings,
    Engine,
    EngineInfo,
    EngineSpec,
    Finished,
    GenerateRequest,
    GenerationEvent,
    load_engine,
)
from nodes.errors import CorralError
from nodes.logs import setup_logging

log = logging.getLogger("corral.replica")

REPLICA_DEPLOYMENT = "ModelReplica"


@dataclass(frozen=True, slots=True)
class Admitted:
    """First event of every stream: the prompt was valid and the work is queued."""


@dataclass(frozen=True, slots=True)
class Refused:
    """The request cannot run (prompt too long, bad schema ...): the client's mistake.

    Returned as data rather than raised so that Serve does not log a client's
    mistake as a replica failure with a traceback.
    """

    error: CorralError


StreamEvent = Admitted | Refused | GenerationEvent


@dataclass(frozen=True, slots=True)
class ReplicaStats:
    """What a replica reports about its load and history."""

    pending: int  # generations running or waiting
    finished: int  # generations that ran to a stop or length limit
    cancelled: int  # generations stopped because the caller went away
    failed: int  # generations that raised


_END = object()


class ModelReplica:
    """One loaded engine behind an ordered queue (see module docstring).

    Plain Python: ``ServedReplica`` is the Serve entry point that loads the
    engine; tests may wrap any engine directly.
    """

    def __init__(self, engine: Engine) -> None:
        self._engine = engine
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="engine")
        self._pending = 0  # generations submitted and not finished
        self._cancels: set[threading.Event] = set()  # one per live generation
        self._outcomes = {"finished": 0, "cancelled": 0, "failed": 0}

    async def info(self) -> EngineInfo:
        return self._engine.info

    async def stats(self) -> ReplicaStats:
        return ReplicaStats(pending=self._pending, **self._outcomes)

    async def generate(self, request: GenerateRequest) -> AsyncIterator[list[StreamEvent]]:
        """Stream batches of events: ``[Admitted]`` first, ``Finished`` last.

        A request that cannot run gets ``[Refused]`` as its only batch.
        """
        loop = asyncio.get_running_loop()
        try:
            # Rendering the template and tokenizing read only the vocabulary, so they
            # may run beside a generation; they take well under a millisecond for a
            # chat turn, less than a hop to another thread would cost.
            tokens = self._engine.encode(request)
        except CorralError as exc:
            yield [Refused(exc)]
            return
        queue: asyncio.Queue[Any] = asyncio.Queue()
        cancel = threading.Event()
        submitted = time.perf_counter()

        def put(item: Any) -> None:
            try:
                loop.call_soon_threadsafe(queue.put_nowait, item)
            except RuntimeError:  # the event loop is gone: the replica is stopping
                cancel.set()

        def work() -> None:
            outcome = "cancelled"
            try:
                if cancel.is_set():
                    return
                waited = time.perf_counter() - submitted
                for event in self._engine.generate(tokens, request.params, cancel):
                    if isinstance(event, Finished):
                        outcome = "cancelled" if event.reason == "cancelled" else "finished"
                        event = replace(event, timings=replace(event.timings, queued=waited))
                    put(event)
            except BaseException as exc:  # noqa: BLE001 - handed to the caller
                outcome = "failed"
                log.error("generation failed: %r", exc)
                put(exc)
            finally:
                self._outcomes[outcome] += 1
                put(_END)

        self._pending += 1
        self._cancels.add(cancel)
        self._executor.submit(work)
        try:
            yield [Admitted()]
            while True:
                batch = [await queue.get()]
                while not queue.empty():
                    batch.append(queue.get_nowait())
                events = [e for e in batch if e is not _END and not isinstance(e, BaseException)]
                if events:
                    yield events
                for item in batch:
                    if isinstance(item, BaseException):
                        raise item
                if batch[-1] is _END:
                    return
        finally:
            cancel.set()
            self._cancels.discard(cancel)
            self._pending -= 1

    async def embed(self, texts: Sequence[str]) -> Embeddings | Refused:
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(self._executor, self._engine.embed, list(texts))
        except CorralError as exc:
            return Refused(exc)

    def __del__(self) -> None:
        # Serve calls this on graceful shutdown: stop what runs, drop what waits,
        # then free the model's memory.
        for cancel in list(getattr(self, "_cancels", ())):
            cancel.set()
        executor = getattr(self, "_executor", None)
        if executor is not None:
            executor.shutdown(wait=True, cancel_futures=True)
            self._engine.close()


class ServedReplica(ModelReplica):
    """The Serve deployment: loads the engine ``spec`` names, then serves it."""

    async def __init__(self, spec: EngineSpec, log_level: str = "info") -> None:
        setup_logging(log_level)
        # Loading can take minutes for a big model; keep the replica's event loop
        # (health checks, Serve's control calls) responsive meanwhile.
        engine = await asyncio.to_thread(load_engine, spec)
        super().__init__(engine)
        log.info(
            "loaded %s (n_ctx=%d) in %.2fs", spec.model, engine.info.n_ctx, engine.info.load_seconds
        )


def replica_app(
    spec: EngineSpec, *, max_queue: int = 64, log_level: str = "info", options: dict | None = None
) -> Application:
    """The Serve application for one placement of ``spec``.

    ``max_queue`` bounds the requests a replica holds (running + waiting);
    ``options`` are extra ``ray_actor_options`` (resources, label selector).
    """
    actor_options = {"num_cpus": 0, **(options or {})}
    deployment = serve.deployment(
        ServedReplica,
        name=REPLICA_DEPLOYMENT,
        max_ongoing_requests=max_queue,
        ray_actor_options=actor_options,
        # A model load can take minutes on a slow disk; Serve must not give up first.
        health_check_timeout_s=60,
        graceful_shutdown_timeout_s=5,
        # The ingress logs every request; a second line per request here is noise.
        logging_config={"enable_access_log": False},
    )
    return deployment.bind(spec, log_level)
