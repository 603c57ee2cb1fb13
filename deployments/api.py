"""The Corral HTTP app: every API's routes, one error path, the health check.

``build_api(backend)`` returns a plain FastAPI app. The Serve ingress
(``deployments/ingress.py``) serves it on the cluster; tests may serve it with
any ``ModelBackend``.
"""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from starlette.exceptions import HTTPException

from deployments.backend import ModelBackend
from deployments.cluster_api import cluster_router
from deployments.errors import ApiError, classify, openai_body
from deployments.middleware import AccessLog, CancelOnDisconnect, JsonBodies
from deployments.ollama.api import ollama_router
from deployments.ollama.serving import OllamaServing
from deployments.openai.api import openai_router
from deployments.openai.serving import OpenAIServing
from nodes.errors import CorralError

log = logging.getLogger("corral.api")

RUNNING = "Corral is running"


def build_api(backend: ModelBackend, *, version: str = "dev") -> FastAPI:
    """The FastAPI app serving ``backend``."""
    app = FastAPI(
        title="Corral",
        version=version,
        description="Local LLMs on a homelab cluster: OpenAI and Ollama APIs.",
    )
    app.include_router(openai_router(OpenAIServing(backend)))
    app.include_router(ollama_router(OllamaServing(backend)))
    app.include_router(cluster_router(backend))

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


def error_response(path: str, error: ApiError) -> Response:
    """``error`` in the shape of the API that ``path`` belongs to."""
    if path.startswith("/api/"):
        body: dict = error.ollama_body
    else:
        body = openai_body(error)
    return JSONResponse(body, status_code=error.status, headers=error.headers)


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
