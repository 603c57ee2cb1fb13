"""The Corral HTTP app: every API's routes, one error path, the health check.

``build_api(backend)`` returns a plain FastAPI app. The Serve ingress
(``deployments/ingress.py``) serves it on the cluster; tests may serve it with
any ``ModelBackend``.
"""

from __future__ import annotations

import logging

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from starlette.exceptions import HTTPException
from starlette.types import Receive, Scope, Send

from deployments.anthropic.api import ANTHROPIC_PREFIX, anthropic_router
from deployments.anthropic.serving import AnthropicServing
from deployments.auth import Authenticate, Keyring, KeyScopedBackend
from deployments.backend import ModelBackend
from deployments.cluster_api import cluster_router
from deployments.context import RequestIds, current_request, note_route
from deployments.dashboard.feed import Feed
from deployments.dashboard.routes import dashboard_router
from deployments.errors import ApiError, anthropic_body, classify, openai_body
from deployments.metrics import ApiMetrics, RequestMetrics, metrics_router
from deployments.middleware import (
    AccessLog,
    BodyLimit,
    CancelOnDisconnect,
    HttpMiddleware,
    JsonBodies,
    SentStatus,
)
from deployments.ollama.api import ollama_router
from deployments.ollama.serving import OllamaServing
from deployments.openai.api import openai_router
from deployments.openai.serving import OpenAIServing
from deployments.responses.api import responses_router
from deployments.responses.serving import ResponsesServing
from nodes.errors import CorralError

log = logging.getLogger("corral.api")

RUNNING = "Corral is running"
FASTAPI_PARSE_ERROR = "There was an error parsing the body"
DEFAULT_MAX_BODY = 32 * 1024**2  # bytes: a million-token prompt is about 4 MB of JSON


def build_api(
    backend: ModelBackend,
    *,
    version: str = "dev",
    keyring: Keyring | None = None,
    metrics: ApiMetrics | None = None,
    max_body: int = DEFAULT_MAX_BODY,
) -> FastAPI:
    """The FastAPI app serving ``backend``; ``keyring`` says which API keys it takes
    (None: no keys, every request is served); ``max_body`` is the largest request body
    in bytes (model uploads excepted)."""
    app = FastAPI(
        title="Corral",
        version=version,
        description=(
            "Local LLMs on a homelab cluster: the OpenAI API (chat, completions, embeddings "
            "and the Responses API), Ollama's API and Anthropic's Messages API."
        ),
        dependencies=[Depends(note_route)],
    )
    keyring = keyring or Keyring(None)
    metrics = metrics or ApiMetrics()
    scoped = KeyScopedBackend(backend)  # each call held to what the request's key allows
    app.include_router(openai_router(OpenAIServing(scoped)))
    app.include_router(responses_router(ResponsesServing(scoped)))
    app.include_router(anthropic_router(AnthropicServing(scoped)))
    app.include_router(ollama_router(OllamaServing(scoped)))
    app.include_router(cluster_router(scoped, Feed(backend, metrics.activity)))
    app.include_router(dashboard_router())
    app.include_router(metrics_router(backend, metrics))
    metrics.use_routes(app.router.routes)

    @app.get("/", response_class=PlainTextResponse, tags=["Health"])
    @app.head("/", response_class=PlainTextResponse, include_in_schema=False)
    async def root() -> str:
        return RUNNING

    # Outermost last: ids for every response, then the last-resort 500 (so it carries
    # the id and the route's shape), metrics and the access log, the key check (before
    # any body is read), the body limit, ...
    app.add_middleware(JsonBodies)
    app.add_middleware(CancelOnDisconnect)
    app.add_middleware(BodyLimit, limit=max_body, render=error_response)
    app.add_middleware(Authenticate, keyring=keyring, render=error_response)
    app.add_middleware(AccessLog)
    app.add_middleware(RequestMetrics, metrics=metrics)
    app.add_middleware(_LastResort)
    app.add_middleware(RequestIds)
    app.add_exception_handler(CorralError, _error_handler)
    app.add_exception_handler(RequestValidationError, _error_handler)
    app.add_exception_handler(HTTPException, _http_error_handler)
    return app


def error_response(path: str, error: ApiError) -> Response:
    """``error`` in the shape of the API that ``path`` belongs to."""
    if path.startswith("/api/"):
        body: dict = error.ollama_body
    elif path == ANTHROPIC_PREFIX or path.startswith(ANTHROPIC_PREFIX + "/"):
        ctx = current_request()
        body = anthropic_body(error, ctx.id if ctx is not None else None)
    else:
        body = openai_body(error)
    return JSONResponse(body, status_code=error.status, headers=error.headers)


class _LastResort(HttpMiddleware):
    """An exception no handler took becomes a 500 in the route's shape.

    Starlette sends those from its outermost layer, around every middleware, so
    the answer would lack the request id and count nowhere; this catches them
    first. Once a response has begun (a stream), the exception ends it instead."""

    async def handle(self, scope: Scope, receive: Receive, send: Send) -> None:
        sent = SentStatus(send)
        try:
            await self.app(scope, receive, sent)
        except Exception as exc:
            if sent.status:
                raise
            await error_response(scope["path"], classify(exc))(scope, receive, send)


async def _error_handler(request: Request, exc: Exception) -> Response:
    return error_response(request.url.path, classify(exc))


async def _http_error_handler(request: Request, exc: HTTPException) -> Response:
    # Starlette's own errors: unknown path (404), wrong method (405), ...
    if exc.status_code == 404:
        message = f"There is no route {request.method} {request.url.path}."
    elif exc.status_code == 400 and exc.detail == FASTAPI_PARSE_ERROR:
        # What FastAPI says when the JSON parser itself gives up (not a syntax error).
        message = (
            "The request body cannot be read as JSON: it nests too deeply or holds a number "
            "too long to parse. Send a flatter body with ordinary numbers."
        )
    else:
        message = str(exc.detail)
    kind = "invalid_request_error" if exc.status_code < 500 else "server_error"
    return error_response(request.url.path, ApiError(exc.status_code, message, kind))
