"""The browser playground: one static page with its styles and scripts, from package data.

The page and its assets are public (the page asks for an API key and sends it with each API
call it makes). `is_playground_path` is the one place that says which paths those are, so a
key check that runs before routing can let them through.
"""

from __future__ import annotations

from fastapi import FastAPI, Request
from starlette.responses import Response
from starlette.staticfiles import StaticFiles
from starlette.types import Scope

PAGE = "/"
ASSETS = "/playground"

# Only our own files may load or run: no inline script or style, no other origin, no framing.
CONTENT_SECURITY_POLICY = "; ".join(
    [
        "default-src 'self'",
        "script-src 'self'",
        "style-src 'self'",
        "img-src 'self'",
        "connect-src 'self'",
        "object-src 'none'",
        "base-uri 'none'",
        "form-action 'none'",
        "frame-ancestors 'none'",
    ]
)

SECURITY_HEADERS = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    # Revalidate (cheaply, by ETag) so an upgraded server never runs stale scripts.
    "Cache-Control": "no-cache",
}


def is_playground_path(path: str) -> bool:
    """True for the paths of the playground, which need no API key."""
    return path in (PAGE, ASSETS) or path.startswith(ASSETS + "/")


class PlaygroundFiles(StaticFiles):
    """The playground's files, each sent with the security headers."""

    def __init__(self) -> None:
        super().__init__(packages=[("chatgate.api", "playground")])

    async def get_response(self, path: str, scope: Scope) -> Response:
        response = await super().get_response(path, scope)
        response.headers.update(SECURITY_HEADERS)
        return response


def mount(app: FastAPI) -> None:
    """Serve the page at `/` and its assets under `/playground/`."""
    files = PlaygroundFiles()

    @app.api_route(PAGE, methods=["GET", "HEAD"], include_in_schema=False)
    async def page(request: Request) -> Response:
        """The playground page."""
        return await files.get_response("index.html", request.scope)

    app.mount(ASSETS, files, name="playground")
