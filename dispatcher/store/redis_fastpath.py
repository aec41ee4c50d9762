"""The Redis engine's fast reply reader: the one place that uses redis-py internals.

What it buys: the Redis engine's "100 agents x 10 in flight" round-trip row
(docs/benchmarks.md). The engine reads two replies per command; redis-py's
public ``read_response()`` costs about a microsecond of coroutines, timeouts
and push-message checks per reply. :func:`read_replies` takes the replies
already received straight from hiredis' reader and awaits only for more bytes.

What it relies on (none of it is redis-py's public API; hiredis' own
``Reader`` is public):

- ``redis._parsers.hiredis._AsyncHiredisParser``: the parser class of an
  asyncio connection when hiredis is installed, found as ``conn._parser``;
- its ``_reader`` attribute, the ``hiredis.Reader`` that ``on_connect`` builds
  with ``notEnoughData=redis._parsers.hiredis.NOT_ENOUGH_DATA`` and
  ``replyError=`` the parser's ``parse_error`` (an error reply comes back as a
  ``ResponseError`` instance, ``NoScriptError`` for ``-NOSCRIPT``, not raised);
- its coroutine ``read_from_socket()``, which feeds the reader the next bytes
  and raises ``ConnectionError`` when the server closed the connection;
- RESP2 (the store connects with ``protocol=2``): no push messages between
  replies, which redis-py's ``read_response`` would otherwise route.

:func:`check` verifies all of that once per process, without a network (it
builds a parser and feeds its reader canned replies), and says why not when it
fails; the store then reads with redis-py's public ``read_response()``
(:func:`read_replies_public`) and logs ``redis_fast_path enabled=False``.
``HubConfig.redis_fast_path=False`` (``DISPATCHER_REDIS_FAST_PATH=0``) skips
the fast reader whatever the check says.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

from redis.asyncio.connection import AbstractConnection
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError, ResponseError

__all__ = ["FastPath", "ReplyReader", "check", "read_replies", "read_replies_public"]

ReplyReader = Callable[[AbstractConnection, int], Awaitable[list[Any]]]


@dataclass(frozen=True, slots=True)
class FastPath:
    """The outcome of :func:`check`: whether the fast reader can run, and why (not)."""

    enabled: bool
    reason: str


@functools.cache
def check() -> FastPath:
    """Whether the installed redis-py and hiredis have what :func:`read_replies` needs.

    Run once per process (cached). Never raises: anything unexpected is a
    reason to use the public reader.
    """
    try:
        return _check()
    except Exception as exc:  # a release we do not know: the public reader is always right
        return FastPath(False, f"self-test failed: {type(exc).__name__}: {exc}")


def _check() -> FastPath:
    import redis  # noqa: PLC0415

    try:
        import hiredis  # noqa: PLC0415
    except ImportError:
        return FastPath(False, "hiredis is not installed")
    try:
        from redis._parsers import hiredis as parsers  # noqa: PLC0415
    except ImportError:
        return FastPath(False, f"redis-py {redis.__version__} has no redis._parsers.hiredis")
    versions = f"redis-py {redis.__version__}, hiredis {hiredis.__version__}"
    parser_class = getattr(parsers, "_AsyncHiredisParser", None)
    sentinel = getattr(parsers, "NOT_ENOUGH_DATA", None)
    if parser_class is None or sentinel is None:
        return FastPath(False, f"{versions}: no _AsyncHiredisParser or NOT_ENOUGH_DATA")
    if not inspect.iscoroutinefunction(getattr(parser_class, "read_from_socket", None)):
        return FastPath(False, f"{versions}: _AsyncHiredisParser.read_from_socket is not a "
                               "coroutine function")
    # Build a parser as a connection would and feed its reader canned replies:
    # the sentinel, an error reply returned (not raised), then a plain reply.
    parser = parser_class(socket_read_size=65536)
    stand_in = SimpleNamespace(_reader=None,
                               encoder=SimpleNamespace(decode_responses=False))
    parser.on_connect(stand_in)
    reader = getattr(parser, "_reader", None)
    if reader is None or not callable(getattr(reader, "gets", None)):
        return FastPath(False, f"{versions}: the parser keeps no hiredis reader in _reader")
    if reader.gets() is not sentinel:
        return FastPath(False, f"{versions}: the reader does not answer NOT_ENOUGH_DATA")
    reader.feed(b"-NOSCRIPT No matching script.\r\n-ERR bad\r\n$2\r\nok\r\n$3\r\nab")
    replies = [reader.gets(), reader.gets(), reader.gets(), reader.gets()]
    parser.on_disconnect()
    if not (isinstance(replies[0], NoScriptError) and isinstance(replies[1], ResponseError)
            and replies[2] == b"ok" and replies[3] is sentinel):
        return FastPath(False, f"{versions}: unexpected replies from the reader: {replies!r}")
    # Bound once here, read per batch by read_replies.
    global _PARSER_CLASS, _NOT_ENOUGH_DATA
    _PARSER_CLASS, _NOT_ENOUGH_DATA = parser_class, sentinel
    return FastPath(True, versions)


async def read_replies(conn: AbstractConnection, count: int) -> list[Any]:
    """The next ``count`` replies on ``conn``, straight from hiredis' reader.

    Only after :func:`check` said yes. A command's error reply is returned as
    its ``ResponseError`` (the connection is still in sync); anything else
    raises. The caller bounds the whole batch with one timeout. A connection
    that does not have the hiredis parser is read with the public reader.
    """
    parser = getattr(conn, "_parser", None)
    reader = getattr(parser, "_reader", None) if isinstance(parser, _PARSER_CLASS) else None
    if reader is None or parser is None:
        return await read_replies_public(conn, count)
    gets, more = reader.gets, parser.read_from_socket
    not_enough = _NOT_ENOUGH_DATA
    results: list[Any] = []
    for _ in range(count):
        reply = gets()
        while reply is not_enough:
            await more()
            reply = gets()
        if isinstance(reply, RedisConnectionError):
            raise reply
        if type(reply) is list and reply and isinstance(reply[0], RedisConnectionError):
            raise reply[0]  # as redis-py's parser does
        results.append(reply)
    return results


async def read_replies_public(conn: AbstractConnection, count: int) -> list[Any]:
    """The same as :func:`read_replies` through redis-py's public ``read_response()``."""
    results: list[Any] = []
    for _ in range(count):
        try:
            results.append(await conn.read_response())
        except ResponseError as exc:  # one command's; still in sync
            results.append(exc)
    return results


class _NoParser:
    """Nothing is an instance of it: the fast reader's class until :func:`check` said yes."""


# Bound by a successful check(); read per batch by read_replies.
_PARSER_CLASS: type = _NoParser
_NOT_ENOUGH_DATA: object = object()
