"""The web page at ``GET /``: static HTML/JS/CSS served by the app itself (no build step, no CDN).

The page builds its form from ``GET /v1/info``, runs requests through ``POST /v1/detail/stream``
and fills the form from a ComfyUI workflow with ``POST /v1/workflow/import``. These routes need
no deployment state, so they live on a router the ingress includes.
"""

from __future__ import annotations

import html
from pathlib import Path

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response

STATIC_DIR = Path(__file__).parent / "static"
ASSET_TYPES = {".js": "text/javascript; charset=utf-8", ".css": "text/css; charset=utf-8", ".svg": "image/svg+xml"}
NO_CACHE = {"Cache-Control": "no-cache"}

web_router = APIRouter()


def _base_href(request: Request) -> str:
    """The app's own prefix (Serve's route_prefix), so the page works under any route."""
    return html.escape(request.scope.get("root_path", "").rstrip("/") + "/", quote=True)


@web_router.get("/", include_in_schema=False)
async def index(request: Request) -> HTMLResponse:
    page = (STATIC_DIR / "index.html").read_text(encoding="utf-8")
    return HTMLResponse(page.replace("{{BASE}}", _base_href(request)), headers=NO_CACHE)


@web_router.get("/web/{name}", include_in_schema=False)
async def asset(name: str) -> Response:
    path = STATIC_DIR / name
    media_type = ASSET_TYPES.get(path.suffix)
    if media_type is None or path.name != name or not path.is_file():
        return JSONResponse({"error": f"no web asset {name!r}"}, status_code=404)
    return Response(path.read_bytes(), media_type=media_type, headers=NO_CACHE)
