"""Single-flight for identical concurrent misses (the router's TTL'd LRUs are gmco_common.lru.TtlLru)."""

from __future__ import annotations

import asyncio
from collections.abc import Hashable
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


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
