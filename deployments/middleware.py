"""ASGI middleware of the HTTP app: lenient JSON bodies, a body size limit, access log,
cancel on disconnect."""

from __future__ import annotations

import asyncio
import logging
import time
from abc import ABC, abstractmethod
from collections.abc import Callable

from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from deployments.errors import ApiError, classify
from nodes.errors import CorralError

log = logging.getLogger("corral.api")
access_log = logging.getLogger("corral.access")


class HttpMiddleware(ABC):
    """Acts on HTTP requests; passes lifespan and websocket traffic through untouched."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        await self.handle(scope, receive, send)

    @abstractmethod
    async def handle(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Serve one HTTP request through ``self.app``."""


class SentStatus:
    """A ``send`` that remembers the status of the response once it has started (0: not yet)."""

    def __init__(self, send: Send) -> None:
        self.status = 0
        self._send = send

    async def __call__(self, message: Message) -> None:
        if message["type"] == "http.response.start":
            self.status = message["status"]
        await self._send(message)


class JsonBodies(HttpMiddleware):
    """Read every API body as JSON, whatever Content-Type the client sent.

    OpenAI's and Ollama's servers do; scripts often post JSON with curl -d
    (form-encoded) or with no Content-Type, and should not get a confusing 400.
    """

    async def handle(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["method"] == "POST":
            headers = [(k, v) for k, v in scope["headers"] if k != b"content-type"]
            scope = {**scope, "headers": [*headers, (b"content-type", b"application/json")]}
        await self.app(scope, receive, send)


class BodyTooLarge(CorralError):
    """A request body over the limit (413)."""

    kind = "too_large"


# Routes whose bodies are model files, streamed to disk: no size limit.
UNLIMITED_BODIES = ("/api/blobs/",)


class BodyLimit(HttpMiddleware):
    """Refuse (413) a request body larger than ``limit`` bytes before any route reads it.

    A body whose Content-Length is over the limit is refused unread; one sent
    without a length (chunked) is read up to the limit and refused there. The
    routes parse whole JSON bodies anyway, so reading the body here costs no
    memory they would not spend; it is then handed on as one message. Model
    uploads (``/api/blobs``) stream to disk and are exempt.
    """

    def __init__(
        self, app: ASGIApp, limit: int, render: Callable[[str, ApiError], Response]
    ) -> None:
        super().__init__(app)
        self.limit = limit
        self.render = render

    async def handle(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope["path"]
        if scope["method"] in ("GET", "HEAD") or path.startswith(UNLIMITED_BODIES):
            await self.app(scope, receive, send)
            return
        length = dict(scope["headers"]).get(b"content-length", b"")
        if length.isdigit() and int(length) > self.limit:
            await self._refuse(scope, receive, send)
            return
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return  # the client left while sending
            size += len(message.get("body", b""))
            if size > self.limit:
                await self._refuse(scope, receive, send)
                return
            chunks.append(message.get("body", b""))
            if not message.get("more_body"):
                break
        body_sent = False

        async def replay() -> Message:
            nonlocal body_sent
            if not body_sent:
                body_sent = True
                return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
            return await receive()  # after the body: the client's disconnect

        await self.app(scope, replay, send)

    async def _refuse(self, scope: Scope, receive: Receive, send: Send) -> None:
        error = BodyTooLarge(
            f"The request body is larger than this server takes ({self.limit:,} bytes); "
            f"send less, or raise max_body in the server's settings."
        )
        await self.render(scope["path"], classify(error))(scope, receive, send)


class AccessLog(HttpMiddleware):
    """One line per request once its response is complete (streams: when they end).

    Logged at DEBUG: each line crosses Ray's log forwarding to the driver, which
    on a small box measurably delays the next request's first token.
    """

    async def handle(self, scope: Scope, receive: Receive, send: Send) -> None:
        started = time.perf_counter()
        sent = SentStatus(send)
        try:
            await self.app(scope, receive, sent)
        finally:
            ms = 1000 * (time.perf_counter() - started)
            status = sent.status or "-"
            access_log.debug("%s %s %s %.1fms", scope["method"], scope["path"], status, ms)


class CancelOnDisconnect(HttpMiddleware):
    """Cancel a request whose client has gone, so its generation stops and frees the replica.

    Streaming responses notice on their own (the next send fails); a client
    waiting for a whole (non-streamed) answer is only noticed by listening for
    ``http.disconnect`` while the handler works. The generation path cancels its
    replica stream when it is cancelled (``deployments/dispatch.py``).
    """

    async def handle(self, scope: Scope, receive: Receive, send: Send) -> None:
        body_read = asyncio.Event()
        responded = client_gone = False

        async def tracked_receive() -> Message:
            message = await receive()
            if message["type"] == "http.disconnect" or not message.get("more_body"):
                body_read.set()
            return message

        async def tracked_send(message: Message) -> None:
            nonlocal responded
            if message["type"] == "http.response.body" and not message.get("more_body"):
                responded = True
            await send(message)

        handler = asyncio.ensure_future(self.app(scope, tracked_receive, tracked_send))

        async def watch() -> None:
            nonlocal client_gone
            await body_read.wait()
            while not responded:
                if (await receive())["type"] == "http.disconnect" and not responded:
                    client_gone = True
                    handler.cancel()
                    return

        watcher = asyncio.ensure_future(watch())
        try:
            await handler
        except asyncio.CancelledError:
            if not client_gone:
                raise  # we were cancelled ourselves (server shutdown): pass it on
            log.info("client went away; cancelled %s %s", scope["method"], scope["path"])
        finally:
            watcher.cancel()
