"""HTTP wiring for Anthropic's Messages API: parse, call ``AnthropicServing``, send.

Errors raised by the serving layer reach the app's exception handlers
(``deployments/api.py``), which render Anthropic's error shape for every path
under ``ANTHROPIC_PREFIX``. The key check (``deployments/auth.py``) takes the key
from ``x-api-key`` too, as Anthropic's clients send it.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

from fastapi import APIRouter
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel

from deployments.anthropic import protocol as p
from deployments.anthropic.serving import AnthropicServing
from deployments.openai.api import SSE_HEADERS

ANTHROPIC_PREFIX = "/v1/messages"  # every path of this API, for the error shape


def _send(result: BaseModel | AsyncIterator[str]) -> Response:
    if isinstance(result, BaseModel):
        return JSONResponse(result.model_dump(mode="json"))
    return StreamingResponse(result, media_type="text/event-stream", headers=SSE_HEADERS)


def anthropic_router(serving: AnthropicServing) -> APIRouter:
    """``/v1/messages`` and its token count, bound to one ``AnthropicServing``."""
    router = APIRouter(prefix=ANTHROPIC_PREFIX, tags=["Anthropic"])

    @router.post("", response_model=p.Message)
    async def messages(req: p.MessagesRequest) -> Response:
        return _send(await serving.messages(req))

    @router.post("/count_tokens", response_model=p.TokenCount)
    async def count_tokens(req: p.CountTokensRequest) -> Response:
        return _send(await serving.count_tokens(req))

    return router
