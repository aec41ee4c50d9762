"""The web dashboard's files, served by the admin HTTP server at ``/``.

The page (``dispatcher/dashboard/``: HTML, CSS and plain JavaScript, no build
step) is package data, read once through :mod:`importlib.resources` so it is
found wherever the package is installed (a wheel, a zip, an editable checkout).
The files hold no data and need no token: the page asks for the admin token
itself and sends it with every API request, so it works with and without one.
Everything it shows comes from the admin API and its event streams.
"""

from __future__ import annotations

import hashlib
from importlib import resources

from aiohttp import web

__all__ = ["FILES", "add_routes", "read_files"]

# The files of the page and their content types; nothing else is served.
FILES: dict[str, str] = {
    "index.html": "text/html; charset=utf-8",
    "app.js": "text/javascript; charset=utf-8",
    "app.css": "text/css; charset=utf-8",
}

# The page loads only its own files and talks only to this origin; agent-provided
# text is put in the page as text, and this policy is the second line behind it.
CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
       "img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")


def read_files() -> dict[str, bytes]:
    """The page's files as shipped in the package, by name."""
    folder = resources.files("dispatcher") / "dashboard"
    return {name: folder.joinpath(name).read_bytes() for name in FILES}


def add_routes(app: web.Application) -> None:
    """Serve the dashboard: ``/`` is the page, ``/ui/NAME`` its script and style."""
    files = read_files()
    etags = {name: '"' + hashlib.sha256(body).hexdigest()[:16] + '"'
             for name, body in files.items()}

    def answer(request: web.Request, name: str) -> web.Response:
        headers = {"Content-Type": FILES[name], "ETag": etags[name],
                   "Cache-Control": "no-cache", "X-Content-Type-Options": "nosniff",
                   "Content-Security-Policy": CSP, "Referrer-Policy": "no-referrer"}
        if request.headers.get("If-None-Match") == etags[name]:
            return web.Response(status=304, headers=headers)
        return web.Response(body=files[name], headers=headers)

    async def page(request: web.Request) -> web.Response:
        return answer(request, "index.html")

    async def asset(request: web.Request) -> web.Response:
        name = request.match_info["name"]
        if name not in files or name == "index.html":
            raise web.HTTPNotFound()
        return answer(request, name)

    app.router.add_get("/", page, name="dashboard")
    app.router.add_get("/ui/{name}", asset, name="dashboard_asset")
