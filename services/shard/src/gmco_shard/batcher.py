"""Micro-batching: concurrent searches are merged into one backend call so that a GPU sees large batches.

Requests are grouped by a key; only requests with the same key share a batch. The shard uses
(k, filter bytes, ef, exact) as the key: one search call has one k, one pre-filter bitset and one set
of search parameters, so requests that differ in any of them run in separate batches. (Merging
different k by searching max-k and trimming, or different filters with a per-query bitmap, would cost
every caller of the batch; at the router's traffic the common case is many users with the same
context filter.)

A group is sent when adding the next request would take it past ``max_rows`` (what is waiting goes
first, the newcomer starts the next group), when it reaches ``max_rows`` exactly, or ``window`` seconds
after its first request, whichever comes first. A request of ``max_rows`` rows or more runs at once on
its own, never waiting for the window. Each caller gets the batch's result and the slice of its own
rows in it; an error raised by the batch reaches every caller of that batch.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Hashable
from dataclasses import dataclass, field
from typing import Generic, TypeVar

import numpy as np

R = TypeVar("R")


@dataclass
class _Group(Generic[R]):
    parts: list[tuple[np.ndarray, asyncio.Future[tuple[R, slice]]]] = field(default_factory=list)
    rows: int = 0
    timer: asyncio.TimerHandle | None = None


class MicroBatcher(Generic[R]):
    """``run(queries, key)`` computes one batch; ``submit`` returns ``(that result, this caller's rows)``."""

    def __init__(self, run: Callable[[np.ndarray, Hashable], Awaitable[R]], window: float = 0.001,
                 max_rows: int = 1024) -> None:
        if window < 0 or max_rows < 1:
            raise ValueError("window must be >= 0 seconds and max_rows >= 1")
        self._run = run
        self._window = window
        self._max = max_rows
        self._groups: dict[Hashable, _Group[R]] = {}
        self._running: set[asyncio.Task[None]] = set()
        self.batches_run = 0

    async def submit(self, queries: np.ndarray, key: Hashable) -> tuple[R, slice]:
        n = queries.shape[0]
        if self._window == 0 or n >= self._max:
            self.batches_run += 1
            return await self._run(queries, key), slice(0, n)
        group = self._groups.get(key)
        if group is not None and group.rows + n > self._max:
            self._flush(key)
            group = None
        loop = asyncio.get_running_loop()
        if group is None:
            group = self._groups[key] = _Group()
            group.timer = loop.call_later(self._window, self._flush, key)
        fut: asyncio.Future[tuple[R, slice]] = loop.create_future()
        group.parts.append((queries, fut))
        group.rows += n
        if group.rows >= self._max:
            self._flush(key)
        return await fut

    def _flush(self, key: Hashable) -> None:
        group = self._groups.pop(key, None)
        if group is None:
            return
        if group.timer is not None:
            group.timer.cancel()
        task = asyncio.ensure_future(self._execute(group, key))
        self._running.add(task)  # the loop keeps only weak references to tasks
        task.add_done_callback(self._running.discard)

    async def _execute(self, group: _Group[R], key: Hashable) -> None:
        self.batches_run += 1
        parts = group.parts
        try:
            merged = parts[0][0] if len(parts) == 1 else np.concatenate([q for q, _ in parts])
            result = await self._run(merged, key)
        except asyncio.CancelledError:  # shutting down: release the callers rather than leave them waiting
            for _, fut in parts:
                fut.cancel()
            raise
        except Exception as exc:  # noqa: BLE001 - every caller of the batch gets the error
            for _, fut in parts:
                if not fut.done():
                    fut.set_exception(exc)
            return
        start = 0
        for q, fut in parts:
            stop = start + q.shape[0]
            if not fut.done():  # a caller whose deadline passed has gone
                fut.set_result((result, slice(start, stop)))
            start = stop
