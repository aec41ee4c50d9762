"""The repository stands alone: no file points at design documents that do not ship
with it. The wire protocol, the public API and the Redis layout are described in
docs/ (protocol.md, guide.md, admin-api.md, cli.md, redis.md)."""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# Spelled in pieces, so that this file does not name them itself.
OUTSIDE = [name + ".md" for name in ("PROTOCOL", "API", "ARCHITECTURE", "PERFORMANCE", "STYLE",
                                     "LESSONS")] + ["shared/" + "design", "../" + "shared"]
SUFFIXES = {".py", ".md", ".toml", ".yaml", ".yml", ".service", ".txt", ".cfg", ".js", ".html",
            ".css", ".sh"}


def files() -> list[Path]:
    out = []
    for path in ROOT.rglob("*"):
        rel = path.relative_to(ROOT).parts
        if any(p.startswith(".") or p.endswith(".egg-info") or p == "__pycache__"
               for p in rel[:-1]):
            continue
        if path.is_file() and (path.suffix in SUFFIXES or path.name == "Dockerfile"):
            out.append(path)
    return out


def test_nothing_points_outside_the_repository() -> None:
    found = files()
    assert ROOT / "docs" / "protocol.md" in found and ROOT / "dispatcher" / "hub.py" in found
    hits = [f"{path.relative_to(ROOT)}:{n}: {line.strip()}"
            for path in found
            for n, line in enumerate(path.read_text(errors="replace").splitlines(), 1)
            if any(name in line for name in OUTSIDE)]
    assert not hits, "\n".join(hits)
