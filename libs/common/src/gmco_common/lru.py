"""A generic in-process LRU whose entries are trusted for a TTL (router lists and versions, compiled
filters in the router and the ontology). ``get_stale`` ignores the TTL: the last known value, for when
the source is down. (The cache service's byte-bounded store is a backend of its own, not this.)"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class TtlLru(Generic[K, V]):
    """At most ``size`` entries, each trusted for ``ttl`` seconds (``None``: no expiry)."""

    def __init__(self, size: int, ttl: float | None, clock: Callable[[], float] = time.monotonic) -> None:
        if size < 1:
            raise ValueError("size must be >= 1")
        self._size = size
        self._ttl = ttl
        self._clock = clock
        self._data: OrderedDict[K, tuple[float, V]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._data)

    def get(self, key: K) -> V | None:
        entry = self._data.get(key)
        if entry is None or (self._ttl is not None and self._clock() - entry[0] > self._ttl):
            return None
        self._data.move_to_end(key)
        return entry[1]

    def get_stale(self, key: K) -> V | None:
        entry = self._data.get(key)
        return None if entry is None else entry[1]

    def put(self, key: K, value: V) -> None:
        self._data[key] = (self._clock(), value)
        self._data.move_to_end(key)
        while len(self._data) > self._size:
            self._data.popitem(last=False)

    def pop(self, key: K) -> V | None:
        entry = self._data.pop(key, None)
        return None if entry is None else entry[1]

    def clear(self) -> None:
        self._data.clear()
