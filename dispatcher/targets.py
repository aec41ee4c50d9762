"""Targets of a job (docs/fleets.md): which agents ``execute_on_agents`` runs a command on.

A target is one agent id, a list of ids (``"web-1,web-2"`` as a string), a
glob on the ids of connected agents (``"web-*"``, ``"*"``), or a selector on
their ``meta``: a dict ``{"role": "db", "region": "eu*"}`` or the string
``"role=db,region=eu*"``; every pair must match, values may be globs, the key
``id`` matches the agent id. Parsing is pure; :func:`match` resolves a parsed
target against the connected agents. ``batch`` and ``max_failures`` amounts
(``3`` or ``"25%"``) are parsed here too.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from fnmatch import fnmatchcase
from typing import Any

from agent_client import protocol as P

from .models import AgentInfo

__all__ = ["Target", "TargetSpec", "match", "parse_amount", "parse_target", "resolve_amount"]

# What a caller may pass as a target.
Target = str | list[str] | tuple[str, ...] | dict[str, str]

_GLOB_CHARS = frozenset("*?[]!")
_GLOB_RE = re.compile(r"[A-Za-z0-9._:@*?\[\]!-]{1,128}")
_META_KEY_RE = re.compile(r"[A-Za-z0-9._:@-]{1,128}")
_MAX_VALUE = 256


@dataclass(frozen=True, slots=True)
class TargetSpec:
    """A parsed target: exactly one of ``ids``, ``glob`` or ``selector`` is set."""

    ids: tuple[str, ...] | None = None
    glob: str | None = None
    selector: tuple[tuple[str, str], ...] | None = None

    def describe(self) -> Any:
        """The target as stored in the job record (JSON-friendly)."""
        if self.ids is not None:
            return self.ids[0] if len(self.ids) == 1 else list(self.ids)
        if self.glob is not None:
            return self.glob
        assert self.selector is not None
        return dict(self.selector)


def parse_target(target: object) -> TargetSpec:
    """``target`` parsed; ``ValueError`` naming what is wrong (``TypeError`` for a
    value of the wrong kind)."""
    if isinstance(target, dict):
        return _selector(list(target.items()), target)
    if isinstance(target, list | tuple):
        return _ids(list(target), target)
    if not isinstance(target, str):
        raise TypeError(f"invalid target {target!r}: expected an agent id, a list of ids, "
                        "a glob or a selector")
    text = target.strip()
    if "=" in text:
        pairs: list[tuple[object, object]] = []
        for item in text.split(","):
            key, sep, value = item.partition("=")
            if not sep:
                raise ValueError(f"invalid target {target!r}: {item.strip()!r} is not key=value")
            pairs.append((key.strip(), value.strip()))
        return _selector(pairs, target)
    if any(c in _GLOB_CHARS for c in text):
        if not _GLOB_RE.fullmatch(text):
            raise ValueError(f"invalid target {target!r}: not a glob on agent ids")
        return TargetSpec(glob=text)
    return _ids([i.strip() for i in text.split(",")], target)


def _ids(ids: list[object], target: object) -> TargetSpec:
    if not ids:
        raise ValueError("invalid target []: the list of agent ids is empty")
    checked: list[str] = []
    for agent_id in ids:
        if not P.is_valid_agent_id(agent_id):
            raise ValueError(f"invalid target {target!r}: {agent_id!r} is not an agent id")
        checked.append(agent_id)
    return TargetSpec(ids=tuple(dict.fromkeys(checked)))


def _selector(pairs: list[tuple[object, object]], target: object) -> TargetSpec:
    if not pairs:
        raise ValueError("invalid target {}: the selector is empty")
    out: list[tuple[str, str]] = []
    for key, value in pairs:
        if not isinstance(key, str) or not _META_KEY_RE.fullmatch(key):
            raise ValueError(f"invalid target {target!r}: {key!r} is not a meta key")
        if not isinstance(value, str) or not value or len(value) > _MAX_VALUE:
            raise ValueError(f"invalid target {target!r}: the value of {key!r} must be a "
                             f"non-empty string of at most {_MAX_VALUE} characters")
        out.append((key, value))
    return TargetSpec(selector=tuple(out))


def match(spec: TargetSpec, agents: list[AgentInfo]) -> list[str]:
    """The ids of ``agents`` that a glob or selector target matches, sorted."""
    if spec.glob is not None:
        glob = spec.glob
        return sorted(a.id for a in agents if fnmatchcase(a.id, glob))
    assert spec.selector is not None
    selector = spec.selector
    return sorted(a.id for a in agents if all(_pair_matches(a, k, v) for k, v in selector))


def _pair_matches(agent: AgentInfo, key: str, pattern: str) -> bool:
    if key == "id":
        return fnmatchcase(agent.id, pattern)
    if key not in agent.meta:
        return False
    value = agent.meta[key]
    text = value if isinstance(value, str) else str(value).lower() if isinstance(value, bool) \
        else str(value)
    return fnmatchcase(text, pattern)


def parse_amount(value: object, name: str, *, minimum: int) -> int | float | None:
    """``batch``/``max_failures`` checked: an int (at least ``minimum``) stays an int,
    ``"25%"`` becomes the float 25.0 (between 1 and 100), a digit string an int."""
    if value is None:
        return None
    if isinstance(value, bool):
        raise TypeError(f"{name} must be a number or a percentage like '25%'")
    if isinstance(value, float) and value.is_integer():
        value = int(value)  # JSON's 2.0
    if isinstance(value, str):
        text = value.strip()
        if text.endswith("%"):
            try:
                share = float(text[:-1])
            except ValueError:
                raise ValueError(f"{name} {value!r} is not a percentage like '25%'") from None
            if not 1 <= share <= 100:
                raise ValueError(f"{name} {value!r}: a percentage must be between 1% and 100%")
            return share
        if not text.isdigit():
            raise ValueError(f"{name} {value!r} is not a number or a percentage like '25%'")
        value = int(text)
    if not isinstance(value, int):
        raise TypeError(f"{name} must be a number or a percentage like '25%'")
    if value < minimum:
        raise ValueError(f"{name} must be at least {minimum}, not {value}")
    return value


def resolve_amount(amount: int | float | None, total: int, *, minimum: int) -> int | None:
    """A parsed amount for ``total`` targets: a percentage rounds down, to at least
    ``minimum`` (``batch`` 1, ``max_failures`` 0)."""
    if amount is None:
        return None
    if isinstance(amount, float):
        return max(minimum, math.floor(total * amount / 100))
    return amount
