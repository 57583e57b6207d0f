"""A bounded LRU that counts its hits and misses, safe across threads: the prompt-encoding cache
and the identity cache (a profile set reuses one prompt or one reference for many images)."""

from __future__ import annotations

from threading import Lock
from typing import Generic, TypeVar

from cachetools import LRUCache

V = TypeVar("V")


class CountingLRU(Generic[V]):
    def __init__(self, capacity: int) -> None:
        self._entries: LRUCache[str, V] | None = LRUCache(capacity) if capacity > 0 else None
        self._lock = Lock()
        self.hits = 0
        self.misses = 0

    def get(self, key: str) -> V | None:
        with self._lock:
            value = None if self._entries is None else self._entries.get(key)
            if value is None:
                self.misses += 1
            else:
                self.hits += 1
            return value

    def put(self, key: str, value: V) -> None:
        if self._entries is not None:
            with self._lock:
                self._entries[key] = value

    def __len__(self) -> int:
        return 0 if self._entries is None else len(self._entries)
