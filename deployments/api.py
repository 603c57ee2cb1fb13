"""The Corral HTTP app: every API's routes, one error path, the health check.

``build_api(backend)`` returns a plain FastAPI app. The Serve ingress
(``deployments/ingress.py``) serves it on the cluster; tests may serve it with
any ``ModelBackend``.
"""

from __future__ import annotations

import asyncio
import logging
import time

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from deployments.backend import ModelBackend
from deployments.errors import ApiError, classify, openai_body
from deployments.openai.api import openai_router
from deployments.openai.serving import OpenAIServing
from nodes.errors import CorralError

log = logging.getLogger("corral.api")
access_log = logging.getLogger("corral.access")

RUNNING = "Corral is running"


def build_api(backend: ModelBackend, *, version: str = "dev") -> FastAPI:
    """The FastAPI app serving ``backend``."""
    app = FastAPI(
        title="Corral",
        version=version,
        description="Local LLMs on a homelab cluster: OpenAI and Ollama APIs.",
    )
    app.include_router(openai_router(OpenAIServing(backend)))

    @app.get("/", response_class=PlainTextResponse, tags=["Health"])
    @app.head("/", response_class=PlainTextResponse, include_in_schema=False)
    async def root() -> str:
        return RUNNING

    app.add_middleware(JsonBodies)
    app.add_middleware(CancelOnDisconnect)
    app.add_middleware(AccessLog)
    app.add_exception_handler(CorralError, _error_handler)
    app.add_exception_handler(RequestValidationError, _error_handler)
    app.add_exception_handler(HTTPException, _http_error_handler)
    app.add_exception_handler(Exception, _error_handler)  # last resort: a generic 500
    return app


class JsonBodies:
    """Read every API body as JSON, whatever Content-Type the client sent.

    OpenAI's and Ollama's servers do; scripts often post JSON with curl -d
    (form-encoded) or with no Content-Type, and should not get a confusing 400.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == "POST":
            headers = [(k, v) for k, v in scope["headers"] if k != b"content-type"]
            scope = {**scope, "headers": [*headers, (b"content-type", b"application/json")]}
        await self.app(scope, receive, send)


class AccessLog:
    """One line per request once its response is complete (streams: when they end)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 0

        async def logged_send(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, logged_send)
        finally:
            ms = 1000 * (time.perf_counter() - started)
            access_log.info("%s %s %s %.1fms", scope["method"], scope["path"], status or "-", ms)


class CancelOnDisconnect:
    """Cancel a request whose client has gone, so its generation stops and frees the replica.

    Streaming responses notice on their own (the next send fails); a client
    waiting for a whole (non-streamed) answer is only noticed by listening for
    ``http.disconnect`` while the handler works. The generation path cancels its
    replica stream when it is cancelled (``deployments/backend.py``).
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
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


def error_response(path: str, error: ApiError) -> Response:
    """``error`` in the shape of the API that ``path`` belongs to."""
    if path.startswith("/api/"):
        return JSONResponse({"error": error.message}, status_code=error.status)
    return JSONResponse(openai_body(error), status_code=error.status)


async def _error_handler(request: Request, exc: Exception) -> Response:
    return error_response(request.url.path, classify(exc))


async def _http_error_handler(request: Request, exc: HTTPException) -> Response:
    # Starlette's own errors: unknown path (404), wrong method (405), ...
    if exc.status_code == 404:
        message = f"There is no route {request.method} {request.url.path}."
    else:
        message = str(exc.detail)
    kind = "invalid_request_error" if exc.status_code < 500 else "server_error"
    return error_response(request.url.path, ApiError(exc.status_code, message, kind))
