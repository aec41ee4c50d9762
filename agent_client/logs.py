"""Logging set-up for programs' entry points (only they configure logging).

Readable console lines on a terminal, JSON lines otherwise (or when asked),
through structlog; the standard library's records (websockets, aiohttp) go
through the same renderer. Colour only on a terminal, and never with
``NO_COLOR`` set (https://no-color.org). The hub and the agent process read the
same settings: ``--log-level`` / ``DISPATCHER_LOG_LEVEL`` and ``--log-format`` /
``DISPATCHER_LOG_FORMAT`` (:func:`log_settings`).
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Mapping

import structlog

__all__ = ["FORMATS", "LEVELS", "LOG_VARIABLES", "configure_logging", "log_settings"]

LEVELS = ("debug", "info", "warning", "error")
FORMATS = ("json", "console")
LOG_VARIABLES = ("DISPATCHER_LOG_LEVEL", "DISPATCHER_LOG_FORMAT")


def log_settings(level: str | None, fmt: str | None, default_level: str = "info",
                 env: Mapping[str, str] | None = None) -> tuple[str, bool | None]:
    """The level and JSON-or-not from the flags (None: not given), else the variables,
    else the default (JSON unless stderr is a terminal). ``ValueError`` names the
    flag or variable and what it takes."""
    env = os.environ if env is None else env
    chosen = []
    for flag, variable, given, allowed in (("--log-level", LOG_VARIABLES[0], level, LEVELS),
                                           ("--log-format", LOG_VARIABLES[1], fmt, FORMATS)):
        where = f"{flag} {given}"
        raw = given
        if raw is None and env.get(variable):
            raw = env[variable]
            where = f"{variable}={raw}"
        value = None if raw is None else raw.strip().lower()
        if value is not None and value not in allowed:
            raise ValueError(f"{where}: expected one of {', '.join(allowed)}")
        chosen.append(value)
    return chosen[0] or default_level, None if chosen[1] is None else chosen[1] == "json"


def configure_logging(level: str = "info", json: bool | None = None) -> None:
    """Configure structlog and stdlib logging for a command-line program (``json``
    None: JSON lines unless stderr is a terminal)."""
    tty = sys.stderr.isatty()
    if json is None:
        json = not tty
    lvl = logging.getLevelNamesMapping()[level.upper()]
    shared: list[structlog.types.Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    renderer: structlog.types.Processor = (
        structlog.processors.JSONRenderer() if json else
        structlog.dev.ConsoleRenderer(colors=tty and not os.environ.get("NO_COLOR"))
    )
    structlog.configure(
        processors=[*shared, structlog.processors.format_exc_info,
                    structlog.stdlib.ProcessorFormatter.wrap_for_formatter],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.make_filtering_bound_logger(lvl),
        cache_logger_on_first_use=True,
    )
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=shared, processors=[
            structlog.stdlib.ProcessorFormatter.remove_processors_meta, renderer]))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(lvl)
    # websockets logs every failed handshake at error level; keep them at warning.
    logging.getLogger("websockets").setLevel(max(lvl, logging.WARNING))
