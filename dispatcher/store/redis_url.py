"""One URL configures the Redis engine: plain Redis, TLS, a Unix socket, or Sentinel.

``redis://[[user]:password@]host[:port][/db]``, ``rediss://...`` (TLS) and
``unix:///path/to/redis.sock?db=0`` are redis-py's own URL forms.
``redis+sentinel://[[user]:password@]host1:26379,host2:26379/SERVICE[/db]``
asks the Sentinels for the current primary of ``SERVICE`` and follows
fail-overs (the password, if any, is the primary's).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote, urlsplit

from redis.asyncio import ConnectionPool, Redis
from redis.asyncio.sentinel import Sentinel, SentinelConnectionPool

__all__ = ["SentinelURL", "make_client", "make_pool", "parse_sentinel_url"]

SENTINEL_SCHEME = "redis+sentinel"


@dataclass(frozen=True, slots=True)
class SentinelURL:
    hosts: list[tuple[str, int]]
    service: str
    db: int = 0
    username: str | None = None
    password: str | None = None


def parse_sentinel_url(url: str) -> SentinelURL | None:
    """The parts of a ``redis+sentinel://`` URL, or None for any other URL."""
    parts = urlsplit(url)
    if parts.scheme != SENTINEL_SCHEME:
        return None
    netloc = parts.netloc
    username = password = None
    if "@" in netloc:
        creds, netloc = netloc.rsplit("@", 1)
        user, _, pwd = creds.partition(":")
        username, password = unquote(user) or None, unquote(pwd) or None
    hosts: list[tuple[str, int]] = []
    for item in netloc.split(","):
        host, _, port = item.rpartition(":") if ":" in item else (item, "", "26379")
        hosts.append((host or "127.0.0.1", int(port or 26379)))
    path = [p for p in parts.path.split("/") if p]
    if not path:
        raise ValueError("a redis+sentinel:// URL needs the service name: .../SERVICE[/db]")
    db = int(path[1]) if len(path) > 1 else 0
    return SentinelURL(hosts, path[0], db, username, password)


def make_pool(url: str, **kwargs: Any) -> ConnectionPool:
    """A connection pool for any supported URL (extra kwargs go to each connection)."""
    sentinel = parse_sentinel_url(url)
    if sentinel is None:
        return ConnectionPool.from_url(url, **kwargs)
    manager = Sentinel(  # type: ignore[no-untyped-call]
        sentinel.hosts, socket_connect_timeout=kwargs.get("socket_connect_timeout"))
    return SentinelConnectionPool(  # type: ignore[no-untyped-call]
        sentinel.service, manager, db=sentinel.db, username=sentinel.username,
        password=sentinel.password, **kwargs,
    )


def make_client(url: str, **kwargs: Any) -> Redis:
    """A client (for pub/sub) on its own pool."""
    return Redis(connection_pool=make_pool(url, **kwargs))
