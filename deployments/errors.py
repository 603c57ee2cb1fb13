"""The one place that turns an exception into an HTTP error.

``classify`` maps any exception (ours, pydantic's, Ray's) to an ``ApiError``:
status, message, and OpenAI's ``type``/``code``/``param``. Each API renders
that in its own shape (``openai_body`` here; the Ollama routes use just the
message). Client mistakes become 4xx with a message that says what to change;
anything unexpected becomes a 5xx that reveals nothing about the internals.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass
from typing import Any

from fastapi.exceptions import RequestValidationError
from pydantic import ValidationError
from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError, RayTaskError

from nodes.errors import CorralError, ModelNotFound, ServiceUnavailable

log = logging.getLogger("corral.errors")


@dataclass(frozen=True, slots=True)
class ApiError:
    status: int
    message: str
    type: str = "invalid_request_error"
    code: str | None = None
    param: str | None = None
    retry_after: float | None = None  # seconds; sent as a Retry-After header
    ollama_message: str | None = None  # Ollama's own words, where its clients expect them

    @property
    def ollama_body(self) -> dict[str, Any]:
        """Ollama's error shape: ``{"error": "..."}``."""
        return {"error": self.ollama_message or self.message}

    @property
    def headers(self) -> dict[str, str] | None:
        if self.status == 401:
            return {"WWW-Authenticate": "Bearer"}
        if self.retry_after is None:
            return None
        return {"Retry-After": str(max(1, math.ceil(self.retry_after)))}


# CorralError.kind -> (HTTP status, OpenAI error type, OpenAI code)
_KINDS: dict[str, tuple[int, str, str | None]] = {
    "invalid_request": (400, "invalid_request_error", None),
    "context_length_exceeded": (400, "invalid_request_error", "context_length_exceeded"),
    "model_not_found": (404, "invalid_request_error", "model_not_found"),
    "model_load_failed": (500, "server_error", "model_load_failed"),
    # A download from a registry, a URL or the head failed: the fault is upstream.
    "pull_failed": (502, "server_error", "pull_failed"),
    "unavailable": (503, "server_error", "service_unavailable"),
    # The model's process died on this request twice: a bad gateway, as a proxy says of a
    # backend that dropped the connection (not worth retrying at once).
    "model_crashed": (502, "server_error", "model_crashed"),
    "model_failed": (503, "server_error", "model_failed"),
    # OpenAI's rate-limit shape: its SDKs retry a 429 after Retry-After by themselves.
    "overloaded": (429, "rate_limit_error", "overloaded"),
    # API keys (deployments/auth.py): OpenAI's own codes for these.
    "unauthorized": (401, "invalid_request_error", "invalid_api_key"),
    "forbidden": (403, "invalid_request_error", "model_not_allowed"),
    "too_large": (413, "invalid_request_error", "request_too_large"),
}

INTERNAL = ApiError(500, "The server had an error while processing your request.", "server_error")


def unwrap(exc: BaseException) -> BaseException:
    """The original exception behind Ray's wrappers (actor and Serve calls)."""
    while isinstance(exc, RayTaskError) and exc.cause is not None:
        exc = exc.cause
    return exc


def classify(exc: BaseException) -> ApiError:
    """Map any exception to the error a client should see."""
    exc = unwrap(exc)
    if isinstance(exc, ActorDiedError | ActorUnavailableError | RayActorError):
        exc = ServiceUnavailable(
            "The model's replica stopped while serving this request (its process or its "
            "node went away). Retry it: another replica will take it.",
            retry_after=1,
        )
    if isinstance(exc, CorralError):
        status, type_, code = _KINDS.get(exc.kind, (500, "server_error", exc.kind))
        retry_after = getattr(exc, "retry_after", None)
        ollama = f"model '{exc.model}' not found" if isinstance(exc, ModelNotFound) else None
        return ApiError(status, exc.message, type_, code, exc.param, retry_after, ollama)
    if isinstance(exc, RequestValidationError | ValidationError):
        return _validation_error(exc.errors())
    log.error("unexpected error", exc_info=exc)
    return INTERNAL


def _validation_error(errors: Any) -> ApiError:
    """First problem in a request body, with the dotted path of the field."""
    if not errors:
        return ApiError(400, "The request body is invalid.")
    err = errors[0]
    loc = [str(p) for p in err.get("loc", ()) if p != "body"]
    if err.get("type") == "json_invalid":
        ctx = err.get("ctx", {}).get("error", "")
        return ApiError(400, f"The request body is not valid JSON: {ctx}".rstrip(": "))
    # FastAPI's bodies fail as model_attributes_type or dict_type; a body read with
    # model_validate_json (DELETE /api/delete) as model_type.
    not_object = err.get("type") == "model_type" or "dict" in err.get("msg", "")
    if err.get("type") == "model_attributes_type" or (not loc and not_object):
        return ApiError(400, "The request body must be a JSON object.")
    param = ".".join(loc) or None
    msg = err.get("msg", "invalid value")
    if err.get("type") == "missing":
        msg = "Field required"
    where = f"'{param}'" if param else "the body"
    return ApiError(400, f"Invalid value for {where}: {msg}.", param=param)


def openai_body(error: ApiError) -> dict[str, Any]:
    """OpenAI's error shape: ``{"error": {"message", "type", "param", "code"}}``."""
    return {
        "error": {
            "message": error.message,
            "type": error.type,
            "param": error.param,
            "code": error.code,
        }
    }


def openai_sse_error(exc: BaseException) -> str:
    """A streaming error: one SSE event in OpenAI's error shape."""
    return f"data: {json.dumps(openai_body(classify(exc)))}\n\n"


# HTTP status -> Anthropic's error type (its "HTTP errors" page); anything else: api_error.
_ANTHROPIC_TYPES: dict[int, str] = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    503: "overloaded_error",
    529: "overloaded_error",
}


def anthropic_body(error: ApiError, request_id: str | None = None) -> dict[str, Any]:
    """Anthropic's error shape: ``{"type": "error", "error": {"type", "message"}}``,
    with the request's id as its ``request_id`` when there is one."""
    kind = _ANTHROPIC_TYPES.get(error.status)
    if kind is None:
        kind = "invalid_request_error" if error.status < 500 else "api_error"
    body: dict[str, Any] = {"type": "error", "error": {"type": kind, "message": error.message}}
    if request_id:
        body["request_id"] = request_id
    return body
