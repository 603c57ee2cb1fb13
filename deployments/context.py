"""What the app knows about the request it is serving: its id, its API key, its model.

``RequestIds`` (ASGI middleware) gives every HTTP request an id, sends it back
as ``x-request-id`` on every response (errors included), and keeps a
``RequestContext`` in a context variable for the duration of the request, so
that log lines (``nodes/logs.py`` prints ``[req=<id>]``), metrics and the key
checks reach it without threading it through every call.

A client's own ``x-request-id`` is kept when it is a sane token (a proxy or a
script correlating its logs with Corral's); anything else is replaced.
"""

from __future__ import annotations

import re
import time
import uuid
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any

from starlette.requests import Request
from starlette.types import Message, Receive, Scope, Send

from deployments.middleware import HttpMiddleware
from nodes.logs import request_id_var

HEADER = "x-request-id"
_CLIENT_ID = re.compile(r"[A-Za-z0-9._:-]{1,64}")


@dataclass(slots=True)
class RequestContext:
    """One HTTP request as the app sees it."""

    id: str
    started: float = field(default_factory=time.perf_counter)
    grant: Any = None  # the API key's grant (deployments/auth.py); None: no key needed
    model: str | None = None  # the model the request named, once a backend call takes it
    route: str | None = None  # the matched route's path template, e.g. /api/blobs/{digest}


_current: ContextVar[RequestContext | None] = ContextVar("corral_request", default=None)


def current_request() -> RequestContext | None:
    """The request being served in this task, if any."""
    return _current.get()


def note_model(name: str) -> None:
    """Record the model the current request is about (for metrics and logs)."""
    if (ctx := _current.get()) is not None:
        ctx.model = name


def note_route(request: Request) -> None:
    """A dependency of every route: record which route serves the request."""
    if (ctx := _current.get()) is not None and (route := request.scope.get("route")) is not None:
        ctx.route = getattr(route, "path", None)


def new_request_id() -> str:
    return uuid.uuid4().hex[:16]


class RequestIds(HttpMiddleware):
    """The outermost middleware: an id for each request, in the response and the logs."""

    async def handle(self, scope: Scope, receive: Receive, send: Send) -> None:
        given = dict(scope["headers"]).get(HEADER.encode(), b"").decode("latin-1")
        rid = given if _CLIENT_ID.fullmatch(given) else new_request_id()
        ctx = RequestContext(rid)
        token = _current.set(ctx)
        log_token = request_id_var.set(rid)
        header = (HEADER.encode(), rid.encode())

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = [(k, v) for k, v in message.get("headers", []) if k != header[0]]
                message = {**message, "headers": [*headers, header]}
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            request_id_var.reset(log_token)
            _current.reset(token)
