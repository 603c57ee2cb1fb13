"""API key checks: who may call the API, and which models each key may use.

The keys themselves are stored by ``deployments/keys.py``. Once the key file
holds any key (revoked ones included: revoking the last key must not open the
API to everyone) or ``auth.required`` is set, every route but the health check
(``GET /``) and the API docs needs ``Authorization: Bearer <key>`` (or
``x-api-key: <key>``, as Anthropic's clients send it). ``Authenticate`` (ASGI
middleware) checks it and answers 401 in the route's own error shape; the
request's ``Grant`` then rides in the request context, and ``KeyScopedBackend``
refuses (403) any model outside a limited key's list, hides those models from
listings, and keeps the model library and the cluster's inner workings to
unlimited keys.

The ingress's ``Keyring`` re-reads the file when it changes, so ``corral keys
create`` and ``revoke`` take effect on the next request without a restart.
"""

from __future__ import annotations

import hmac
import logging
import os
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from starlette.responses import Response
from starlette.types import ASGIApp, Receive, Scope, Send

from deployments.backend import ModelBackend
from deployments.context import current_request, note_model
from deployments.errors import ApiError, classify
from deployments.keys import ApiKey, KeyFile, KeyFileError, hash_key
from deployments.middleware import HttpMiddleware
from deployments.replica import Refused, StreamEvent
from deployments.views import ClusterMetrics, Event, NodeStatus, PlacementView, PlanView
from nodes.engine import Embeddings, GenerateRequest
from nodes.errors import CorralError
from nodes.models import LocalModel, normalize_name

log = logging.getLogger("corral.auth")

T = TypeVar("T")

# Anthropic's clients send the key as ``x-api-key: <key>``; taken when no Authorization is.
API_KEY_HEADER = b"x-api-key"
# Paths anyone may call: the health check and the API's own documentation. The dashboard's
# page and assets are open too: they hold no data, and the page asks for a key before it
# reads any.
OPEN_PATHS = frozenset(
    {"/", "/docs", "/docs/oauth2-redirect", "/redoc", "/openapi.json", "/ui", "/ui/"}
)
OPEN_PREFIXES = ("/ui/static/",)


class Unauthorized(CorralError):
    """No key, a wrong key or a revoked key (401)."""

    kind = "unauthorized"


class Forbidden(CorralError):
    """A good key asking for something it may not have (403)."""

    kind = "forbidden"


@dataclass(frozen=True, slots=True)
class Grant:
    """What the key of the current request may do."""

    key_id: str
    name: str
    models: frozenset[str] | None  # None: everything

    @property
    def limited(self) -> bool:
        return self.models is not None

    def allows(self, model: str) -> bool:
        return self.models is None or normalize_name(model) in self.models


# The cluster's own nodes: they may read model files (blobs) and nothing else.
NODE_GRANT = Grant("node", "cluster node", None)


@dataclass(slots=True)
class Keyring:
    """The ingress's view of the key file, re-read whenever the file changes."""

    path: Path | None  # None: no key file (tests of the bare app)
    required: bool = False
    # What the cluster's own nodes present to fetch model files from the head
    # (nodes/rayenv.py derives it from the Ray token); None: nodes cannot.
    node_key: str | None = None
    _stamp: tuple[int, int, int] | None = field(default=None, init=False)
    _keys: list[ApiKey] = field(default_factory=list, init=False)
    _error: str | None = field(default=None, init=False)

    def _refresh(self) -> None:
        if self.path is None:
            return
        try:
            st = os.stat(self.path)
            stamp = (st.st_mtime_ns, st.st_size, st.st_ino)
        except FileNotFoundError:
            stamp = None
        if stamp == self._stamp and self._error is None:
            return
        try:
            self._keys = KeyFile(self.path).read()
            self._error = None
        except KeyFileError as exc:
            if self._error != str(exc):
                log.error("API keys cannot be checked: %s", exc)
            self._error = str(exc)
        self._stamp = stamp

    @property
    def active(self) -> bool:
        """Whether requests need a key."""
        self._refresh()
        return self.required or bool(self._keys) or self._error is not None

    def check(self, authorization: str | None, *, path: str = "", method: str = "GET") -> Grant:
        """The grant of the key in an ``Authorization`` header; Unauthorized otherwise."""
        self._refresh()
        if self._error is not None:
            # Fail closed: a damaged key file must not open the API.
            raise Unauthorized(
                "API keys cannot be checked: the server's key file is damaged (see its log)."
            )
        scheme, _, token = (authorization or "").partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            raise Unauthorized(
                "This server needs an API key: send 'Authorization: Bearer <key>' or "
                "'x-api-key: <key>' (keys come from `corral keys create` on the head)."
            )
        if (
            self.node_key is not None
            and method in ("GET", "HEAD")
            and path.startswith("/api/blobs/")
            and hmac.compare_digest(token.encode(), self.node_key.encode())
        ):
            return NODE_GRANT  # a node fetching a model file it must run
        presented = hash_key(token)
        found: ApiKey | None = None
        for key in self._keys:  # every key compared, in constant time each
            if hmac.compare_digest(key.hash, presented):
                found = key
        if found is None:
            raise Unauthorized("The API key is not valid.")
        if found.revoked:
            raise Unauthorized("The API key was revoked.")
        return Grant(
            found.id, found.name, frozenset(found.models) if found.models is not None else None
        )


class Authenticate(HttpMiddleware):
    """Refuse requests without a valid key (when keys are on) before any route runs."""

    def __init__(
        self, app: ASGIApp, keyring: Keyring, render: Callable[[str, ApiError], Response]
    ) -> None:
        super().__init__(app)
        self.keyring = keyring
        self.render = render

    async def handle(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope["path"]
        if path in OPEN_PATHS or path.startswith(OPEN_PREFIXES) or not self.keyring.active:
            await self.app(scope, receive, send)
            return
        headers = dict(scope["headers"])
        header = headers.get(b"authorization", b"").decode("latin-1")
        if not header and (api_key := headers.get(API_KEY_HEADER, b"").decode("latin-1")):
            header = f"Bearer {api_key}"  # Anthropic's clients send the key this way
        try:
            grant = self.keyring.check(header, path=path, method=scope["method"])
        except Unauthorized as exc:
            # Logged without the header: a key, even a wrong one, never reaches the logs.
            log.info("refused %s %s: %s", scope["method"], path, exc.message)
            await self.render(path, classify(exc))(scope, receive, send)
            return
        if (ctx := current_request()) is not None:
            ctx.grant = grant
        await self.app(scope, receive, send)


def current_grant() -> Grant | None:
    """The grant of the current request's key; None when no key was needed."""
    ctx = current_request()
    return ctx.grant if ctx is not None else None


def visible(items: list[T], name: Callable[[T], str]) -> list[T]:
    """The ``items`` naming models the current key may use: what listings show it."""
    grant = current_grant()
    if grant is None or not grant.limited:
        return items
    return [item for item in items if grant.allows(name(item))]


def check_model(model: str) -> None:
    """403 unless the current key may use ``model``; notes the model for metrics."""
    grant = current_grant()
    if grant is not None and not grant.allows(model):
        raise Forbidden(
            f"This API key may not use the model '{model}'. "
            f"It is limited to: {', '.join(sorted(grant.models or ())) or 'no models'}."
        )


def _check_unlimited(what: str) -> None:
    grant = current_grant()
    if grant is not None and grant.limited:
        raise Forbidden(f"This API key is limited to some models; {what} needs an unlimited key.")


class KeyScopedBackend:
    """A ``ModelBackend`` that holds each call to what the current request's key allows.

    Every model a request names passes through here, so this is also where the
    request's model is noted for metrics and logs. Each of ``ModelBackend``'s methods is
    written out here, with its check (``tests/unit/test_auth.py`` fails when one is
    missing): nothing passes through unchecked by accident.
    """

    def __init__(self, inner: ModelBackend) -> None:
        self._inner = inner

    def _use(self, model: str) -> None:
        check_model(model)
        note_model(model)

    async def list_models(self) -> list[LocalModel]:
        # Not filtered: the serving layers cache this listing across requests (and keys).
        # What a client is shown is filtered where it is sent (``visible``).
        return await self._inner.list_models()

    def generate(self, model: str, request: GenerateRequest) -> AsyncIterator[list[StreamEvent]]:
        self._use(model)
        return self._inner.generate(model, request)

    async def embed(
        self, model: str, texts: Sequence[str], keep_alive: float | None = None
    ) -> Embeddings | Refused:
        self._use(model)
        return await self._inner.embed(model, texts, keep_alive)

    async def show_model(self, model: str) -> tuple[LocalModel, dict[str, Any]]:
        self._use(model)
        return await self._inner.show_model(model)

    async def load_model(self, model: str, keep_alive: float | None = None) -> None:
        self._use(model)
        await self._inner.load_model(model, keep_alive)

    async def unload_model(self, model: str) -> bool:
        self._use(model)
        return await self._inner.unload_model(model)

    # -- changing the model library: unlimited keys only --

    def pull(self, model: str, insecure: bool = False) -> AsyncIterator[dict[str, Any]]:
        _check_unlimited("pulling a model")
        note_model(model)
        return self._inner.pull(model, insecure)

    def create_model(self, model: str, recipe: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
        _check_unlimited("creating a model")
        note_model(model)
        return self._inner.create_model(model, recipe)

    async def copy_model(self, source: str, destination: str) -> None:
        _check_unlimited("copying a model")
        note_model(source)
        await self._inner.copy_model(source, destination)

    async def delete_model(self, model: str) -> None:
        _check_unlimited("deleting a model")
        note_model(model)
        await self._inner.delete_model(model)

    async def blob_file(self, digest: str) -> str | None:
        _check_unlimited("reading model files")
        return await self._inner.blob_file(digest)

    async def save_blob(self, digest: str, chunks: AsyncIterator[bytes]) -> None:
        _check_unlimited("uploading model files")
        await self._inner.save_blob(digest, chunks)

    # -- the cluster's inner workings --

    async def cluster_nodes(self) -> list[NodeStatus]:
        _check_unlimited("the cluster's nodes")
        return await self._inner.cluster_nodes()

    async def cluster_events(self, since: float = 0.0) -> list[Event]:
        return visible(await self._inner.cluster_events(since), lambda e: e.model)

    async def models_file(self) -> str:
        _check_unlimited("the models file")
        return await self._inner.models_file()

    async def plan_models(self, text: str, apply: bool = False) -> PlanView:
        _check_unlimited("applying a models file" if apply else "planning a models file")
        return await self._inner.plan_models(text, apply)

    async def cluster_placements(self) -> list[PlacementView]:
        return await self._inner.cluster_placements()  # filtered where sent, as list_models

    # -- the ingress's own view: counts, not models' data --

    async def cluster_metrics(self) -> ClusterMetrics:
        return await self._inner.cluster_metrics()  # /metrics takes no key scope

    def requests_in_flight(self) -> dict[tuple[str, str], int]:
        return self._inner.requests_in_flight()
