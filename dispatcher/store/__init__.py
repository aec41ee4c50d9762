"""Store engines: the interface and its in-memory and Redis implementations."""

from __future__ import annotations

from .base import CreateResult, DropSpec, Store
from .memory import MemoryStore

__all__ = ["CreateResult", "DropSpec", "MemoryStore", "Store"]
