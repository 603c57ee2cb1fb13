"""One Serve deployment per placement: an engine behind an ordered queue.

A replica runs up to ``parallel`` generations at once (the engine's slots: the
llama.cpp engine decodes them together in one batch per step, see
``nodes/batching.py``); more wait in order, first come, first served, and no
request can cancel or corrupt another. Each running generation has a thread
here that reads its tokens and turns them into events; the engine's own loop is
the one thread that computes (llama.cpp's OpenMP keeps a team of worker threads
per calling thread, and a second team's idle spinning steals cores from the busy
one). A caller that goes away sets its cancel flag; the engine frees its slot at
the next step, or skips the work entirely if it was still waiting.

Tokens reach the caller in batches: the first at once, then whatever the
engine produced in the last ``stream_interval`` seconds. Every message costs CPU
in three processes (replica, ingress, client) that the engine's threads need:
one message per token cost a tenth of the decode speed on a 2-core box, while a
50 ms interval is below what a reader of a streamed answer can notice. With
several streams running, the interval grows with them (up to ``MAX_STREAMS_SPACED``
times), so a busy replica sends about as many messages a second as a quiet one:
at four streams on two cores, 150 ms instead of 50 gave the engine back about half
of the ingress's CPU and 0.84x -> 0.91x llama-server's total tokens/s
(bench/overhead.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from typing import Any

import ray
from ray import serve
from ray.serve.deployment import Application

from nodes.agent import LABEL_NODE
from nodes.crashes import CrashNotes, ProcessDeath, notes_dir
from nodes.engine import (
    Embeddings,
    Engine,
    EngineSpec,
    Finished,
    GenerateRequest,
    GenerationEvent,
    load_engine,
)
from nodes.errors import CorralError
from nodes.locate import locate
from nodes.logs import setup_logging
from nodes.rayenv import serve_replica_on_loopback

log = logging.getLogger("corral.replica")

REPLICA_DEPLOYMENT = "ModelReplica"
REPORT_MIN_INTERVAL = 0.05  # seconds between two load reports of a replica, at least
REPORT_HEARTBEAT = 2.0  # seconds between load reports of a replica whose load is unchanged
MAX_STREAMS_SPACED = 3  # the stream interval grows with the running streams up to this many


def stream_spacing(interval: float, running: int) -> float:
    """Seconds between two messages of a stream while ``running`` streams run."""
    return interval * max(1, min(running, MAX_STREAMS_SPACED))


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
class ReplicaLoad:
    """What a replica reports to the controller: how busy it is and since when idle."""

    pending: dict[str, int]  # requests running or waiting, by origin (the ingress that sent them)
    idle_for: float | None  # seconds since its last request ended (or it loaded); None if busy
    keep_alive: float | None  # what its last request asked for (None: the model's keep_alive)
    slots: int = 1  # requests it runs at once

    @property
    def in_flight(self) -> int:
        return sum(self.pending.values())

    @property
    def queued(self) -> int:
        """Requests waiting for a free slot."""
        return max(0, self.in_flight - self.slots)


@dataclass(frozen=True, slots=True)
class ReplicaStats:
    """What a replica reports about its load and history."""

    pending: int  # generations running or waiting
    finished: int  # generations that ran to a stop or length limit
    cancelled: int  # generations stopped because the caller went away
    failed: int  # generations that raised


_END = object()


class _Outbox:
    """Hands a generation's events from the engine thread to the event loop.

    The engine thread only appends; it wakes the loop just when the loop waits
    for a first item, so a stream costs a wake-up per message, not per token.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._items: deque[Any] = deque()
        self._lock = threading.Lock()
        self._waiter: asyncio.Future[None] | None = None
        self._holding: asyncio.Future[None] | None = None  # see ``hold``

    def put(self, item: Any) -> bool:
        """From the engine thread; False once the event loop is gone."""
        with self._lock:
            self._items.append(item)
            waiter, self._waiter = self._waiter, None
            if item is _END and waiter is None:
                waiter, self._holding = self._holding, None
        if waiter is not None:
            try:
                self._loop.call_soon_threadsafe(_resolve, waiter)
            except RuntimeError:
                return False
        return True

    async def get(self) -> list[Any]:
        """On the loop: wait for at least one item, then take all there are."""
        with self._lock:
            waiter = None if self._items else self._loop.create_future()
            self._waiter = waiter
        if waiter is not None:
            await waiter
        return self.take()

    async def hold(self, seconds: float) -> None:
        """On the loop: let more items join for ``seconds``, or until the stream ends (its
        last message is never held back)."""
        with self._lock:
            if self._items and self._items[-1] is _END:
                return
            holding = self._holding = self._loop.create_future()
        try:
            await asyncio.wait({holding}, timeout=seconds)
        finally:
            with self._lock:
                self._holding = None

    def take(self) -> list[Any]:
        """On the loop: whatever is there now (maybe nothing)."""
        with self._lock:
            items = list(self._items)
            self._items.clear()
        return items


def _resolve(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


class ModelReplica:
    """One loaded engine behind an ordered queue (see module docstring).

    Plain Python: ``ServedReplica`` is the Serve entry point that loads the
    engine; tests may wrap any engine directly.
    """

    def __init__(
        self,
        engine: Engine,
        executor: ThreadPoolExecutor | None = None,
        *,
        stream_interval: float = 0.0,
    ) -> None:
        self._engine = engine
        self._slots = max(1, engine.info.parallel)
        self._executor = executor or engine_executor(self._slots)
        self._stream_interval = stream_interval
        self._pending = 0  # generations submitted and not finished
        self._by_origin: dict[str, int] = {}  # requests held (generations and embeddings)
        self._idle_since = time.monotonic()
        self._keep_alive: float | None = None
        self._cancels: set[threading.Event] = set()  # one per live generation
        self._outcomes = {"finished": 0, "cancelled": 0, "failed": 0}
        self.changed = asyncio.Event()  # set whenever ``load()`` changes

    async def stats(self) -> ReplicaStats:
        return ReplicaStats(pending=self._pending, **self._outcomes)

    def load(self) -> ReplicaLoad:
        """How busy this replica is now (see ``ReplicaLoad``)."""
        busy = any(self._by_origin.values())
        idle_for = None if busy else time.monotonic() - self._idle_since
        return ReplicaLoad(dict(self._by_origin), idle_for, self._keep_alive, self._slots)

    def _begin(self, origin: str, keep_alive: float | None) -> None:
        self._by_origin[origin] = self._by_origin.get(origin, 0) + 1
        self._keep_alive = keep_alive
        self.changed.set()

    def _end(self, origin: str) -> None:
        left = self._by_origin.get(origin, 1) - 1
        if left:
            self._by_origin[origin] = left
        else:
            self._by_origin.pop(origin, None)
        self._idle_since = time.monotonic()
        self.changed.set()

    async def generate(
        self, request: GenerateRequest, origin: str = ""
    ) -> AsyncIterator[list[StreamEvent]]:
        """Stream batches of events: ``[Admitted]`` first, ``Finished`` last.

        A request that cannot run gets ``[Refused]`` as its only batch. ``origin``
        names the sender in load reports.
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
        outbox = _Outbox(loop)
        cancel = threading.Event()
        submitted = time.perf_counter()

        def put(item: Any) -> None:
            if not outbox.put(item):  # the event loop is gone: the replica is stopping
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
        self._begin(origin, request.keep_alive)
        self._cancels.add(cancel)
        self._executor.submit(work)
        try:
            yield [Admitted()]
            flushed = 0.0
            while True:
                batch = await outbox.get()
                running = min(self._pending, self._slots)
                wait = flushed + stream_spacing(self._stream_interval, running) - loop.time()
                if wait > 0 and batch[-1] is not _END:
                    await outbox.hold(wait)  # let a few more tokens join this message
                    batch += outbox.take()
                flushed = loop.time()
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
            self._end(origin)

    async def embed(
        self, texts: Sequence[str], origin: str = "", keep_alive: float | None = None
    ) -> Embeddings | Refused:
        """One vector per text; ``keep_alive`` as ``GenerateRequest.keep_alive``."""
        loop = asyncio.get_running_loop()
        self._begin(origin, keep_alive)
        try:
            # Not in the generations' executor, where it would wait for a free slot: the
            # engine runs it between two steps of the generations.
            return await loop.run_in_executor(None, self._engine.embed, list(texts))
        except CorralError as exc:
            return Refused(exc)
        finally:
            self._end(origin)

    def __del__(self) -> None:
        # Serve calls this on graceful shutdown: stop what runs, drop what waits,
        # then free the model's memory. No crash note is left behind.
        notes = getattr(self, "_notes", None)
        if notes is not None:
            notes.disarm()
        for cancel in list(getattr(self, "_cancels", ())):
            cancel.set()
        executor = getattr(self, "_executor", None)
        if executor is not None:
            # The last reference may go on the engine thread itself (a cancelled
            # generation winding down): that thread cannot wait for itself, and runs
            # nothing else meanwhile, so closing the engine here is safe.
            on_engine_thread = threading.current_thread() in getattr(executor, "_threads", ())
            executor.shutdown(wait=not on_engine_thread, cancel_futures=True)
            self._engine.close()


def engine_executor(slots: int = 1) -> ThreadPoolExecutor:
    """A thread per slot of a replica, each running one generation; the rest queue."""
    return ThreadPoolExecutor(max_workers=slots, thread_name_prefix="slot")


class ServedReplica(ModelReplica):
    """The Serve deployment: loads the engine ``spec`` names, then serves it."""

    async def check_health(self) -> None:
        """Serve's health check: an engine whose loop died is restarted with the replica."""
        check = getattr(self._engine, "check", None)
        if check is not None:
            check()

    async def info(self) -> ReplicaInfo:
        """Where this replica runs and what it loaded."""
        return self._info

    async def __init__(self, spec: EngineSpec, options: ReplicaOptions) -> None:
        setup_logging(options.log_level)
        serve_replica_on_loopback()
        # Before anything native runs: a crash from here on leaves a note, and the notes of
        # this placement's processes that crashed before this one are reported.
        self._notes = CrashNotes(notes_dir(serve.get_replica_context().app_name))
        crashed = self._notes.collect()
        self._notes.arm()
        if crashed and options.report_to:
            _report_deaths(crashed, *options.report_to)
        spec = await locate(spec)  # on another node than the head: its own copy, or fetch one
        # Loading can take minutes for a big model; keep the replica's event loop
        # (health checks, Serve's control calls) responsive meanwhile.
        engine = await asyncio.get_running_loop().run_in_executor(None, load_engine, spec)
        super().__init__(engine, stream_interval=options.stream_interval)
        context = ray.get_runtime_context()
        self._info = ReplicaInfo(
            node_id=context.get_node_id(),
            node=context.get_node_labels().get(LABEL_NODE, ""),
            pid=os.getpid(),
            model=spec.model,
            n_ctx=engine.info.n_ctx,
            n_threads=spec.n_threads,
            n_gpu_layers=spec.n_gpu_layers,
            loaded_at=time.time(),
        )
        log.info(
            "loaded %s (n_ctx=%d) in %.2fs", spec.model, engine.info.n_ctx, engine.info.load_seconds
        )
        if options.report_to:
            self._reporter = asyncio.create_task(self._report_forever(*options.report_to))

    async def _report_forever(self, actor: str, namespace: str) -> None:
        """Tell the controller this replica's load: at once when it changes (at most every
        ``REPORT_MIN_INTERVAL``), else every ``REPORT_HEARTBEAT`` so it knows we live."""
        context = serve.get_replica_context()
        app, replica = context.app_name, context.replica_id.unique_id
        controller, sent = None, None
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.changed.wait(), REPORT_HEARTBEAT)
            self.changed.clear()
            try:
                if sent is not None and ray.wait([sent], timeout=0)[0]:
                    # Not waited for when sent; a report that failed means the controller
                    # was replaced (a new ``corral serve``): look it up again by name.
                    sent, last = None, sent
                    await last
                controller = controller or ray.get_actor(actor, namespace)
                sent = controller.report.remote(app, replica, self.load())
            except Exception as exc:  # noqa: BLE001 - the controller may be restarting
                log.debug("load report failed: %r", exc)
                controller = None
            await asyncio.sleep(REPORT_MIN_INTERVAL)


def _report_deaths(deaths: list[ProcessDeath], actor: str, namespace: str) -> None:
    """Tell the controller how this placement's earlier processes died (not waited for)."""
    app = serve.get_replica_context().app_name
    for death in deaths:
        log.error("an earlier process of %s died: %s", app, death.detail)
    try:
        controller = ray.get_actor(actor, namespace)
        for death in deaths:
            controller.replica_died.remote(app, death)
    except Exception as exc:  # noqa: BLE001 - a lost report only weakens the reason shown
        log.warning("could not report earlier crashes to the controller: %r", exc)


@dataclass(frozen=True, slots=True)
class ReplicaInfo:
    """What a replica says about itself."""

    node_id: str  # the Ray node it runs on
    node: str  # that node's Corral name (its corral.node label)
    pid: int
    model: str
    n_ctx: int
    n_threads: int | None
    n_gpu_layers: int
    loaded_at: float  # seconds since the epoch


@dataclass(frozen=True, slots=True)
class ReplicaOptions:
    """How a replica serves, whatever model it runs."""

    max_queue: int = 64  # requests held (running + waiting); more wait at the caller
    stream_interval: float = 0.05  # seconds between messages of a stream, after the first
    log_level: str = "info"
    report_to: tuple[str, str] | None = None  # (actor, namespace) that takes load reports


def replica_app(
    spec: EngineSpec,
    options: ReplicaOptions,
    *,
    num_replicas: int = 1,
    actor_options: dict | None = None,
) -> Application:
    """The Serve application for one placement of ``spec``.

    ``actor_options`` are extra ``ray_actor_options`` (resources, label selector).
    """
    deployment = serve.deployment(
        ServedReplica,
        name=REPLICA_DEPLOYMENT,
        num_replicas=num_replicas,
        max_ongoing_requests=options.max_queue,
        ray_actor_options={"num_cpus": 0, **(actor_options or {})},
        # A model load can take minutes on a slow disk; Serve must not give up first.
        health_check_timeout_s=60,
        # Serve notices a replica whose process died at its next health check (every 10 s by
        # default), and a request moved there waits until then: a crash costs the client
        # this period plus a process start.
        health_check_period_s=2,
        graceful_shutdown_timeout_s=5,
        # The ingress logs every request; a second line per request here is noise.
        logging_config={"enable_access_log": False},
    )
    return deployment.bind(spec, options)
