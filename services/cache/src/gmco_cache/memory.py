"""The embedded backend: an in-process LRU with a TTL per entry, bounded by entries and bytes.

Expiry is lazy: an expired entry is dropped when it is read, or when LRU eviction reaches it. The fill
locks of ``lock_on_miss`` are entries of the same store, so for this backend the stampede protection is
an in-process single-flight: the lock is seen by every request of this process, which is every request
that can read this cache.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import NamedTuple

from prometheus_client import Counter, Gauge

MEMORY_ENTRIES = Gauge("gmco_cache_memory_entries", "Entries held by the in-process cache (expired ones included).")
MEMORY_BYTES = Gauge("gmco_cache_memory_bytes", "Key and value bytes held by the in-process cache.")
MEMORY_EVICTIONS = Counter("gmco_cache_memory_evictions_total", "Entries evicted by the in-process LRU bounds.")


class _Entry(NamedTuple):
    value: bytes
    expires_at: float
    size: int


class BoundedTtlStore:
    """An LRU map of str -> bytes with per-entry TTLs, at most ``max_entries`` and ``max_bytes``."""

    def __init__(self, max_entries: int, max_bytes: int, clock: Callable[[], float] = time.monotonic) -> None:
        self._data: OrderedDict[str, _Entry] = OrderedDict()
        self._max_entries = max_entries
        self._max_bytes = max_bytes
        self._clock = clock
        self.bytes = 0

    def __len__(self) -> int:
        return len(self._data)

    def get(self, key: str) -> bytes | None:
        entry = self._data.get(key)
        if entry is None:
            return None
        if entry.expires_at <= self._clock():
            self._remove(key)
            return None
        self._data.move_to_end(key)
        return entry.value

    def set(self, key: str, value: bytes, ttl_seconds: float) -> bool:
        """Store ``value``; False when it alone is larger than the byte bound."""
        size = len(key) + len(value)
        self._remove(key)
        if size > self._max_bytes:
            return False
        self._data[key] = _Entry(value, self._clock() + ttl_seconds, size)
        self.bytes += size
        while len(self._data) > self._max_entries or self.bytes > self._max_bytes:
            oldest = next(iter(self._data))
            self._remove(oldest)
            MEMORY_EVICTIONS.inc()
        return True

    def delete(self, key: str) -> bool:
        return self._remove(key) is not None

    def _remove(self, key: str) -> _Entry | None:
        entry = self._data.pop(key, None)
        if entry is not None:
            self.bytes -= entry.size
        return entry


class MemoryBackend:
    name = "memory"

    def __init__(self, max_entries: int, max_bytes: int, clock: Callable[[], float] = time.monotonic) -> None:
        self._store = BoundedTtlStore(max_entries, max_bytes, clock)
        MEMORY_ENTRIES.set_function(lambda: len(self._store))
        MEMORY_BYTES.set_function(lambda: self._store.bytes)

    async def get_many(self, keys: Sequence[str]) -> list[bytes | None]:
        return [self._store.get(k) for k in keys]

    async def set_many(self, items: Sequence[tuple[str, bytes, int]]) -> None:
        for key, value, ttl_ms in items:
            self._store.set(key, value, ttl_ms / 1000)

    async def set_if_absent(self, key: str, value: bytes, ttl_ms: int) -> bool:
        if self._store.get(key) is not None:
            return False
        return self._store.set(key, value, ttl_ms / 1000)

    async def delete_if_equal(self, key: str, value: bytes | None) -> bool:
        current = self._store.get(key)
        if current is None or (value is not None and current != value):
            return False
        return self._store.delete(key)

    def failed(self) -> None:
        """Nothing to refresh in process."""
