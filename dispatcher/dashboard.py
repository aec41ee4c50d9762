"""The web dashboard's files, served by the admin HTTP server at ``/``.

The page (``dispatcher/static/``: HTML, CSS and plain JavaScript, no build
step) is package data, read once through :mod:`importlib.resources` so it is
found wherever the package is installed (a wheel, a zip, an editable checkout).
The admin server's route table has one row per file (``/``, ``/ui/app.js``,
``/ui/app.css``), so the OpenAPI document lists them too. The files hold no
data and need no token: the page asks for the admin token
itself and sends it with every API request, so it works with and without one.
Everything it shows comes from the admin API and its event streams.
"""

from __future__ import annotations

import hashlib
from importlib import resources

from aiohttp import web

__all__ = ["CSP", "FILES", "Files", "read_files"]

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
    folder = resources.files("dispatcher") / "static"
    return {name: folder.joinpath(name).read_bytes() for name in FILES}


class Files:
    """The page's files, read once, answered with an ETag and the page's policy."""

    def __init__(self) -> None:
        self.files = read_files()
        self.etags = {name: '"' + hashlib.sha256(body).hexdigest()[:16] + '"'
                      for name, body in self.files.items()}

    def response(self, request: web.Request, name: str) -> web.Response:
        headers = {"Content-Type": FILES[name], "ETag": self.etags[name],
                   "Cache-Control": "no-cache", "X-Content-Type-Options": "nosniff",
                   "Content-Security-Policy": CSP, "Referrer-Policy": "no-referrer"}
        if request.headers.get("If-None-Match") == self.etags[name]:
            return web.Response(status=304, headers=headers)
        return web.Response(body=self.files[name], headers=headers)
