"""The router's small in-process state: a TTL'd LRU and single-flight for identical concurrent misses."""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class TtlLru(Generic[K, V]):
    """At most ``size`` entries, each trusted for ``ttl`` seconds. ``get_stale`` ignores the TTL."""

    def __init__(self, size: int, ttl: float, clock: Callable[[], float] = time.monotonic) -> None:
        self._size = size
        self._ttl = ttl
        self._clock = clock
        self._data: OrderedDict[K, tuple[float, V]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._data)

    def get(self, key: K) -> V | None:
        entry = self._data.get(key)
        if entry is None or self._clock() - entry[0] > self._ttl:
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


class SingleFlight(Generic[K, V]):
    """Concurrent computations of the same key share one: the first caller leads, the rest wait on it."""

    def __init__(self) -> None:
        self._flights: dict[K, asyncio.Future[V]] = {}

    def join(self, key: K) -> asyncio.Future[V] | None:
        """The future of a computation of ``key`` already in flight, or None (then call :meth:`lead`)."""
        return self._flights.get(key)

    def lead(self, key: K) -> asyncio.Future[V]:
        fut: asyncio.Future[V] = asyncio.get_running_loop().create_future()
        self._flights[key] = fut
        return fut

    def land(self, key: K, result: V | None = None, error: BaseException | None = None) -> None:
        """Finish the flight of ``key`` with a result or an error and wake its followers."""
        fut = self._flights.pop(key, None)
        if fut is None or fut.done():
            return
        if error is not None:
            fut.set_exception(error)
            fut.exception()  # mark retrieved: a flight with no followers must not warn
        else:
            fut.set_result(result)  # type: ignore[arg-type]
