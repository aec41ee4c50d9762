"""The dashboard's files: shipped in the package, served at / with a strict policy."""

from __future__ import annotations

import fnmatch
import tomllib
from importlib import resources
from pathlib import Path

import aiohttp

from dispatcher import Dispatcher
from dispatcher.dashboard import FILES, read_files


def test_the_files_are_package_data() -> None:
    folder = resources.files("dispatcher") / "static"
    for name in FILES:
        assert folder.joinpath(name).is_file(), name
    files = read_files()
    page = files["index.html"].decode()
    assert 'id="run"' in page and 'id="login"' in page and 'src="ui/app.js"' in page
    # No third-party origin: the page works offline and behind any firewall.
    for body in files.values():
        assert b"http://" not in body and b"https://" not in body
    # Agent text is only ever set as text.
    assert b"innerHTML" not in files["app.js"] and b"insertAdjacentHTML" not in files["app.js"]


def test_the_wheel_takes_every_file() -> None:
    """An editable install reads the source tree, so check what the wheel is told to take:
    pyproject's package-data must match every file of the page, and every file there is one."""
    root = Path(__file__).resolve().parents[2]
    patterns = tomllib.loads((root / "pyproject.toml").read_text()
                             )["tool"]["setuptools"]["package-data"]["dispatcher"]
    on_disk = {p.name for p in (root / "dispatcher" / "static").iterdir()}
    assert on_disk == set(FILES)
    for name in FILES:
        assert any(fnmatch.fnmatch(f"static/{name}", pattern) for pattern in patterns), name


async def test_served_at_root_without_a_token(make_hub: object) -> None:
    hub: Dispatcher = await make_hub(admin_token="secret")  # type: ignore[operator]
    base = f"http://127.0.0.1:{hub.admin_port}"
    async with aiohttp.ClientSession() as http:
        async with http.get(f"{base}/") as response:
            assert response.status == 200
            assert response.headers["Content-Type"].startswith("text/html")
            assert "script-src 'self'" in response.headers["Content-Security-Policy"]
            etag = response.headers["ETag"]
        async with http.get(f"{base}/", headers={"If-None-Match": etag}) as response:
            assert response.status == 304
        async with http.get(f"{base}/ui/app.js") as response:
            assert response.status == 200
            assert response.headers["Content-Type"].startswith("text/javascript")
        async with http.get(f"{base}/ui/app.css") as response:
            assert response.status == 200
            assert response.headers["Content-Type"].startswith("text/css")
        for missing in ("/ui/index.html", "/ui/nope.js", "/ui/..%2fdashboard.py", "/ui/"):
            async with http.get(f"{base}{missing}") as response:
                assert response.status == 404, missing
                assert (await response.json())["error"]["code"] == "not_found"
        # The data still needs the token; the description lists the page's files.
        async with http.get(f"{base}/agents") as response:
            assert response.status == 401
        async with http.get(f"{base}/openapi.json") as response:
            paths = (await response.json())["paths"]
            assert {"/", "/ui/app.js", "/ui/app.css"} <= set(paths)
            assert paths["/"]["get"]["security"] == []
