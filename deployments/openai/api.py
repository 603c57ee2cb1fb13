"""HTTP wiring for the OpenAI routes: parse, call ``OpenAIServing``, send.

Nothing here decides anything but what a limited API key is shown (a listing
filtered, a model outside its list refused: ``deployments/auth.py``); errors
raised by the serving layer reach the app's exception handlers
(``deployments/api.py``), which render OpenAI's error shape for every ``/v1``
path.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

from fastapi import APIRouter
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel

from deployments.auth import check_model, visible
from deployments.openai import protocol as p
from deployments.openai.serving import OpenAIServing

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def _send(result: BaseModel | AsyncIterator[str]) -> Response:
    if isinstance(result, BaseModel):
        return JSONResponse(result.model_dump(mode="json"))
    return StreamingResponse(result, media_type="text/event-stream", headers=SSE_HEADERS)


def _id(card: p.ModelCard) -> str:
    return card.id


def openai_router(serving: OpenAIServing) -> APIRouter:
    """The ``/v1`` routes, bound to one ``OpenAIServing``."""
    router = APIRouter(prefix="/v1", tags=["OpenAI"])

    @router.post("/chat/completions", response_model=p.ChatCompletion)
    async def chat_completions(req: p.ChatCompletionRequest) -> Response:
        return _send(await serving.chat(req))

    @router.post("/completions", response_model=p.Completion)
    async def completions(req: p.CompletionRequest) -> Response:
        return _send(await serving.completion(req))

    @router.post("/embeddings", response_model=p.EmbeddingResponse)
    async def embeddings(req: p.EmbeddingRequest) -> Response:
        return _send(await serving.embeddings(req))

    @router.get("/models", response_model=p.ModelList)
    async def list_models() -> Response:
        listing = await serving.list_models()
        return _send(listing.model_copy(update={"data": visible(listing.data, _id)}))

    @router.get("/models/{model_id:path}", response_model=p.ModelCard)
    async def get_model(model_id: str) -> Response:
        check_model(model_id)
        return _send(await serving.get_model(model_id))

    return router
