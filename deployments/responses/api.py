"""HTTP wiring for OpenAI's Responses API: parse, call ``ResponsesServing``, send.

Errors take OpenAI's shape, as on every other ``/v1`` route (``deployments/api.py``).
"""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import JSONResponse, Response, StreamingResponse

from deployments.openai.api import SSE_HEADERS
from deployments.responses import protocol as p
from deployments.responses.serving import ResponsesServing


def responses_router(serving: ResponsesServing) -> APIRouter:
    """``POST /v1/responses``, bound to one ``ResponsesServing``."""
    router = APIRouter(prefix="/v1", tags=["OpenAI"])

    @router.post("/responses")
    async def create_response(req: p.ResponsesRequest) -> Response:
        result = await serving.create(req)
        if isinstance(result, dict):
            return JSONResponse(result)
        return StreamingResponse(result, media_type="text/event-stream", headers=SSE_HEADERS)

    return router
