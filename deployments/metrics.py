"""Prometheus metrics at ``/metrics``: what the ingress counts and what the controller knows.

One scrape, two sources:

* The ingress's own counts, in ``ApiMetrics``: a private ``CollectorRegistry``
  per app, so that apps built in one process (tests build many) never share
  series. ``RequestMetrics`` counts each request by route, model and status when
  its response ends (a stream when it ends, or when its client goes away);
  ``deployments/generation.py`` records the tokens, time to first token and
  decode speed of every generation, for both APIs.
* The cluster's state, asked of the backend at scrape time
  (``ModelBackend.cluster_metrics``: what the controller already holds, so a
  scrape probes no node) and rendered into the same answer: placements and
  their load, each node's placements and memory, cold starts, evictions,
  unloads and scale-ups. A controller that does not answer within
  ``CONTROLLER_TIMEOUT`` costs only those families: the scrape still serves the
  ingress's own metrics, with ``corral_controller_up 0``.

Every label has a bounded set of values, so that no client can grow the series
without limit: ``route`` is the matched route's template (``unmatched`` for a
path no route has), never the raw path; ``model`` is the model a request named,
but blank for client errors other than 429, since those include names that do
not exist; ``status`` is the numeric code (499: the client went away before any
response); ``reason`` is a short fixed vocabulary the controller gives each
event.

Which ``ApiMetrics`` a generation records into rides in a context variable
that ``RequestMetrics`` sets for the request: each app's requests reach their
own app's metrics, and code serving no HTTP request (unit tests of the
serving classes) records nothing.
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import Collection, Iterable, Iterator, Mapping
from contextvars import ContextVar

from fastapi import APIRouter
from fastapi.responses import Response
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Histogram,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from starlette.routing import BaseRoute, compile_path, get_route_path
from starlette.types import ASGIApp, Receive, Scope, Send

from deployments.backend import ModelBackend
from deployments.context import current_request
from deployments.dashboard.activity import Activity
from deployments.middleware import HttpMiddleware, SentStatus
from deployments.views import ClusterMetrics, EventCount, EventKind, NodeUse, PlacementLoadView
from nodes.engine import Finished
from nodes.models import normalize_name

try:  # newer FastAPI keeps an included router as one nested entry of app.routes
    from fastapi.routing import iter_route_contexts
except ImportError:  # an older FastAPI: app.routes lists every route itself
    iter_route_contexts = None

log = logging.getLogger("corral.metrics")

# Seconds a scrape waits for the controller before it answers without the cluster's state.
CONTROLLER_TIMEOUT = 2.0
UNMATCHED = "unmatched"  # the route label of a path no route serves
CLIENT_CLOSED = 499  # nginx's status for a client that left before any response was sent
# Time to first token: from a millisecond (a warm replica on the ingress's box) to a
# minute (a large model's cold start on a slow disk).
TTFT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
# Decode speed: a big model on an old CPU to a small one on a fast GPU.
SPEED_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000)

# The counters of the controller's events, and the event kinds (``cluster/controller.py``
# ``_event``) each counts, labelled by model, node and the event's reason category.
EVENT_COUNTERS: dict[str, str] = {
    "corral_cold_starts": "Placements loaded because a model with no replica was asked for "
    "(reason: request, load for Ollama's empty prompt, or retry of a failed one).",
    "corral_evictions": "Idle placements unloaded to make room for another model "
    "(reason: make_room).",
    "corral_unloads": "Placements or replicas unloaded (reason: keep_alive, low_load, asked).",
    "corral_scale_ups": "Replicas added because a model's load stayed above its target "
    "(reason: high_load).",
    "corral_placements_lost": "Placements lost because their node left the cluster "
    "(reason: node_lost).",
    "corral_replacements": "Placements loaded in place of ones lost with a node "
    "(reason: node_lost).",
    "corral_replacements_failed": "Lost placements that fit on no node left (reason: "
    "node_lost); tried again when a node joins.",
    "corral_placements_failed": "Placements given up on because their model process kept "
    "crashing, or crashed while loading (reason: crash_loop); tried again after a back-off.",
}
EVENT_KINDS: dict[EventKind, str] = {
    EventKind.LOAD: "corral_cold_starts",
    EventKind.EVICT: "corral_evictions",
    EventKind.EXPIRE: "corral_unloads",
    EventKind.SCALE_DOWN: "corral_unloads",
    EventKind.UNLOAD: "corral_unloads",
    EventKind.SCALE_UP: "corral_scale_ups",
    EventKind.LOST: "corral_placements_lost",
    EventKind.REPLACE: "corral_replacements",
    EventKind.NOT_REPLACED: "corral_replacements_failed",
    EventKind.FAILED: "corral_placements_failed",
}

_recording: ContextVar[ApiMetrics | None] = ContextVar("corral_metrics", default=None)


def recording() -> ApiMetrics | None:
    """The metrics of the app serving the current request, if any."""
    return _recording.get()


class ApiMetrics:
    """The ingress's own metrics, in a registry of their own (see module docstring)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.routes: list[BaseRoute] = []
        self._templates: list[tuple[re.Pattern[str], str, Collection[str] | None]] | None = None
        self._controller_up = True  # what the last scrape found, to log only the changes
        self.requests = Counter(
            "corral_requests",
            "HTTP requests by route template, model and status, counted when the response "
            "ends (499: the client left before any response).",
            ["route", "model", "status"],
            registry=self.registry,
        )
        self.prompt_tokens = Counter(
            "corral_prompt_tokens",
            "Prompt tokens of finished generations and of embedding inputs.",
            ["model"],
            registry=self.registry,
        )
        self.generated_tokens = Counter(
            "corral_generated_tokens",
            "Tokens generated by finished generations.",
            ["model"],
            registry=self.registry,
        )
        self.time_to_first_token = Histogram(
            "corral_time_to_first_token_seconds",
            "From a request's arrival to its generation's first text (or its end, if it "
            "made none), cold starts and queueing included.",
            ["model"],
            buckets=TTFT_BUCKETS,
            registry=self.registry,
        )
        self.tokens_per_second = Histogram(
            "corral_generation_tokens_per_second",
            "Decode speed of each generation of two tokens or more: the tokens after the "
            "first, over the engine's time for them.",
            ["model"],
            buckets=SPEED_BUCKETS,
            registry=self.registry,
        )
        self.activity = Activity()  # the last minutes, for the dashboard's charts

    def use_routes(self, routes: list[BaseRoute]) -> None:
        """The app's routes, to label requests that never reached one (401, 404, 405).

        The list itself is kept, not a copy: routes added after this call count too.
        """
        self.routes = routes
        self._templates = None

    # -- what requests and generations record --------------------------------------

    def count_request(self, scope: Scope, status: int) -> None:
        ctx = current_request()
        route = (ctx.route if ctx else None) or self.route_of(scope)
        named = ctx.model if ctx and ctx.model else None
        model = model_label(named) if named and not _client_error(status) else ""
        self.requests.labels(route, model, str(status)).inc()

    def route_of(self, scope: Scope) -> str:
        """The template of the route for ``scope``'s path and method; else of the first route
        for its path (a 405); else "unmatched"."""
        if self._templates is None:  # the app is complete once requests arrive
            self._templates = [(compile_path(t)[0], t, m) for t, m in _route_templates(self.routes)]
        path, partial = get_route_path(scope), None
        for regex, template, methods in self._templates:
            if regex.match(path):
                if methods is None or scope["method"] in methods:
                    return template
                partial = partial or template
        return partial or UNMATCHED

    def first_token(self, model: str, seconds: float) -> None:
        self.time_to_first_token.labels(model_label(model)).observe(max(0.0, seconds))
        self.activity.first_token(model_label(model), max(0.0, seconds))

    def finished(self, model: str, event: Finished) -> None:
        """A generation's ``Finished`` event: its tokens, and its decode speed."""
        label, usage, decoding = model_label(model), event.usage, event.timings.generation
        self.prompt_tokens.labels(label).inc(usage.prompt_tokens)
        self.generated_tokens.labels(label).inc(usage.completion_tokens)
        if usage.completion_tokens >= 2 and decoding > 0:  # one token has no decode time
            self.tokens_per_second.labels(label).observe((usage.completion_tokens - 1) / decoding)
        self.activity.finished(label, usage.completion_tokens, decoding)

    def embedded(self, model: str, prompt_tokens: int) -> None:
        self.prompt_tokens.labels(model_label(model)).inc(prompt_tokens)

    # -- the scrape ------------------------------------------------------------------

    async def scrape(self, backend: ModelBackend) -> bytes:
        """The exposition text: this registry, then the cluster's state (see module doc)."""
        local = backend.requests_in_flight()
        try:
            state = await asyncio.wait_for(backend.cluster_metrics(), CONTROLLER_TIMEOUT)
        except Exception as exc:  # noqa: BLE001 - the ingress's own metrics are still worth serving
            if self._controller_up:
                timeout = isinstance(exc, TimeoutError)
                why = f"no answer in {CONTROLLER_TIMEOUT:g}s" if timeout else repr(exc)
                log.warning("/metrics without the cluster's state: the controller: %s", why)
            self._controller_up = False
            state = None
        else:
            if not self._controller_up:
                log.info("/metrics has the cluster's state again: the controller answered")
            self._controller_up = True
        return generate_latest(_Scrape(self.registry, cluster_families(state, local)))


def _route_templates(routes: Iterable[BaseRoute]) -> Iterator[tuple[str, Collection[str] | None]]:
    """The path template and methods (None: any) of every HTTP route, included ones too."""
    if iter_route_contexts is not None:
        found = (
            (c.path, getattr(c.original_route, "methods", None))
            for c in iter_route_contexts(routes)
        )
    else:
        found = ((getattr(r, "path", None), getattr(r, "methods", None)) for r in routes)
    for template, methods in found:
        if template is not None:
            yield template, methods


class _Scrape:
    """A registry's metrics followed by families computed for this scrape alone."""

    def __init__(self, registry: CollectorRegistry, families: list[Metric]) -> None:
        self._registry = registry
        self._families = families

    def collect(self) -> Iterator[Metric]:
        yield from self._registry.collect()
        yield from self._families


def model_label(name: str) -> str:
    """A model's name as the label shows it: Ollama's normal form (``name:tag``)."""
    return normalize_name(name)


def _client_error(status: int) -> bool:
    """A 4xx whose request may name a model that does not exist; 429 names a real one."""
    return 400 <= status < 500 and status != 429


def cluster_families(
    state: ClusterMetrics | None, local: Mapping[tuple[str, str], int]
) -> list[Metric]:
    """The cluster's families from ``state`` (``Controller.metrics``; None: the controller
    did not answer) and ``local``, this ingress's requests in flight by (model, node)."""
    up = GaugeMetricFamily(
        "corral_controller_up", "1 if the controller answered this scrape, else 0."
    )
    up.add_metric([], 0 if state is None else 1)
    mine = GaugeMetricFamily(
        "corral_ingress_in_flight",
        "Requests this ingress has sent to each placement and not yet seen finish (exact).",
        labels=["model", "node"],
    )
    placements = state.placements if state is not None else []
    shown = {(p.model, p.node) for p in placements}
    for key in sorted(shown | set(local)):
        mine.add_metric(list(key), local.get(key, 0))
    if state is None:
        return [up, mine]
    return [
        up,
        mine,
        *_placement_families(placements),
        *_node_families(state.nodes),
        *_event_families(state.events),
    ]


def _placement_families(placements: Iterable[PlacementLoadView]) -> list[Metric]:
    labels = ["model", "node"]
    replicas = GaugeMetricFamily(
        "corral_placement_replicas", "Replicas of each placement (model on node).", labels=labels
    )
    in_flight = GaugeMetricFamily(
        "corral_placement_in_flight",
        "Requests each placement's replicas hold, running or queued, from every ingress "
        "(as the replicas last reported).",
        labels=labels,
    )
    queued = GaugeMetricFamily(
        "corral_placement_queued",
        "Requests waiting on each placement's replicas behind the one each runs.",
        labels=labels,
    )
    for p in placements:
        key = [p.model, p.node]
        replicas.add_metric(key, p.replicas)
        in_flight.add_metric(key, p.in_flight)
        queued.add_metric(key, p.queued)
    return [replicas, in_flight, queued]


# Node gauges: (family, help, the controller's field); memory only for nodes that are up.
_NODE_GAUGES = (
    ("corral_node_up", "1 if the node is up (in Ray and its probe answers), else 0.", "up"),
    ("corral_node_placements", "Placements loaded on each node.", "placements"),
    ("corral_node_replicas", "Model replicas running on each node.", "replicas"),
    ("corral_node_ram_total_bytes", "Each node's RAM.", "ram_total"),
    ("corral_node_ram_used_bytes", "RAM in use on each node, by anything.", "ram_used"),
    ("corral_node_vram_total_bytes", "Each node's VRAM, all its GPUs.", "vram_total"),
    ("corral_node_vram_used_bytes", "VRAM in use on each node, by anything.", "vram_used"),
)


def _node_families(nodes: Iterable[NodeUse]) -> list[Metric]:
    families = [GaugeMetricFamily(name, text, labels=["node"]) for name, text, _ in _NODE_GAUGES]
    for node in nodes:
        for family, (_, _, field) in zip(families, _NODE_GAUGES, strict=True):
            value = getattr(node, field)
            if value is not None:  # memory of a node not probed yet, or down
                family.add_metric([node.name], float(value))
    return families


def _event_families(events: Iterable[EventCount]) -> Iterator[Metric]:
    families = {
        name: CounterMetricFamily(name, text, labels=["model", "node", "reason"])
        for name, text in EVENT_COUNTERS.items()
    }
    for e in events:
        families[EVENT_KINDS[e.kind]].add_metric([e.model, e.node, e.reason], e.count)
    yield from families.values()


class RequestMetrics(HttpMiddleware):
    """Counts each request once its response ends, and makes ``metrics`` the one that
    the request's generations record into."""

    def __init__(self, app: ASGIApp, metrics: ApiMetrics) -> None:
        super().__init__(app)
        self.metrics = metrics

    async def handle(self, scope: Scope, receive: Receive, send: Send) -> None:
        sent = SentStatus(send)
        failed = False
        token = _recording.set(self.metrics)
        try:
            await self.app(scope, receive, sent)
        except Exception:
            failed = True
            raise
        finally:
            _recording.reset(token)
            # Nothing sent: a 500 if it failed (what the last-resort handler outside
            # answers), else the client left first.
            status = sent.status or (500 if failed else CLIENT_CLOSED)
            self.metrics.count_request(scope, status)


def metrics_router(backend: ModelBackend, metrics: ApiMetrics) -> APIRouter:
    router = APIRouter(tags=["Metrics"])

    @router.get("/metrics")
    async def scrape() -> Response:
        """Prometheus metrics: requests, tokens, latency, placements, nodes, events."""
        return Response(await metrics.scrape(backend), media_type=CONTENT_TYPE_LATEST)

    return router
