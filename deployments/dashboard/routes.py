"""The dashboard's page and assets: ``GET /ui`` and ``/ui/static/...``, open without a
key (they hold no data; the page asks for a key before it reads any)."""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import FileResponse
from starlette.exceptions import HTTPException

STATIC = Path(__file__).parent / "static"
UI_PATHS = frozenset({"/ui", "/ui/"})
STATIC_PREFIX = "/ui/static/"


def dashboard_router() -> APIRouter:
    router = APIRouter(include_in_schema=False)

    @router.get("/ui")
    @router.get("/ui/")
    async def page() -> FileResponse:
        return FileResponse(STATIC / "index.html", headers={"Cache-Control": "no-cache"})

    @router.get("/ui/static/{path:path}")
    async def asset(path: str) -> FileResponse:
        root = STATIC.resolve()
        file = (root / path).resolve()
        if not file.is_relative_to(root) or not file.is_file():
            raise HTTPException(404)  # "There is no route GET /ui/static/..."
        return FileResponse(file, headers={"Cache-Control": "no-cache"})

    return router
