"""HTTP wiring for Ollama's native routes under ``/api``: parse, call ``OllamaServing``, send.

Nothing here decides anything but what a limited API key is shown of the
listings (``deployments/auth.visible``); errors raised by the serving layer reach the
app's exception handlers (``deployments/api.py``), which render Ollama's
``{"error": "..."}`` for every ``/api`` path. Streams are NDJSON, one object
per line, as Ollama sends them.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from pydantic import BaseModel

from deployments.auth import visible
from deployments.ollama import protocol as p
from deployments.ollama.serving import OllamaServing

NDJSON = "application/x-ndjson"


def _send(result: BaseModel | dict[str, Any] | AsyncIterator[str]) -> Response:
    if isinstance(result, BaseModel):
        return JSONResponse(result.model_dump(mode="json", exclude_none=True))
    if isinstance(result, dict):
        return JSONResponse(result)
    return StreamingResponse(result, media_type=NDJSON, headers={"X-Accel-Buffering": "no"})


def _name(model: p.ListedModel | p.RunningModel) -> str:
    return model.name


def ollama_router(serving: OllamaServing) -> APIRouter:
    """The ``/api`` routes of Ollama, bound to one ``OllamaServing``."""
    router = APIRouter(prefix="/api", tags=["Ollama"])

    @router.post("/chat")
    async def chat(req: p.ChatRequest) -> Response:
        return _send(await serving.chat(req))

    @router.post("/generate")
    async def generate(req: p.GenerateRequest) -> Response:
        return _send(await serving.generate(req))

    @router.post("/embed", response_model=p.EmbedResponse)
    async def embed(req: p.EmbedRequest) -> Response:
        return _send(await serving.embed(req))

    @router.post("/embeddings", response_model=p.EmbeddingsResponse)
    async def embeddings(req: p.EmbeddingsRequest) -> Response:
        return _send(await serving.embeddings(req))

    @router.get("/tags", response_model=p.TagsResponse)
    async def tags() -> Response:
        listing = await serving.tags()
        return _send(listing.model_copy(update={"models": visible(listing.models, _name)}))

    @router.get("/ps", response_model=p.PsResponse)
    async def ps() -> Response:
        listing = await serving.ps()
        return _send(listing.model_copy(update={"models": visible(listing.models, _name)}))

    @router.post("/show", response_model=p.ShowResponse)
    async def show(req: p.ShowRequest) -> Response:
        return _send(await serving.show(req))

    @router.post("/pull")
    async def pull(req: p.PullRequest) -> Response:
        return _send(await serving.pull(req))

    @router.post("/create")
    async def create(req: p.CreateRequest) -> Response:
        return _send(await serving.create(req))

    @router.delete("/delete")
    async def delete(request: Request) -> Response:
        # Read the body whatever its Content-Type: `curl -X DELETE -d` sends a form type.
        await serving.delete(p.ModelRequest.model_validate_json(await request.body()))
        return Response()

    @router.post("/copy")
    async def copy(req: p.CopyRequest) -> Response:
        await serving.copy(req)
        return Response()

    @router.get("/version", response_model=p.VersionResponse)
    async def version() -> Response:
        return _send(serving.version())

    @router.head("/blobs/{digest}")
    async def blob_exists(digest: str) -> Response:
        return Response(status_code=200 if await serving.blob_file(digest) else 404)

    @router.get("/blobs/{digest}")
    async def blob(digest: str) -> Response:
        """A blob's bytes (Range requests too): how other nodes fetch a model file."""
        path = await serving.blob_file(digest)
        if path is None:
            return JSONResponse({"error": f"blob {digest} not found"}, status_code=404)
        return FileResponse(path, media_type="application/octet-stream")

    @router.post("/blobs/{digest}", status_code=201)
    async def upload_blob(digest: str, request: Request) -> Response:
        if await serving.blob_file(digest):  # as Ollama: a blob it has is not read again
            return Response(status_code=200)
        await serving.save_blob(digest, request.stream())
        return Response(status_code=201)

    return router
