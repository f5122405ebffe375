"""Micro-batching: concurrent searches are merged into one backend call so a GPU sees large batches.

Requests are grouped by a key (k, filter bytes, search params) — only compatible requests share a
batch. A group is flushed when it reaches ``max_batch`` rows or when ``window`` seconds have passed
since its first request; a request that alone fills ``max_batch`` rows runs at once, never delayed.
Each caller gets its own rows back, or the batch's exception.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Hashable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

# run(queries, key) -> per-row results (any sequence-like indexable by row, e.g. arrays of shape (n, k))
RunFn = Callable[[np.ndarray, Hashable], Awaitable[tuple[Any, ...]]]


@dataclass
class _Group:
    parts: list[tuple[np.ndarray, asyncio.Future]] = field(default_factory=list)
    rows: int = 0
    timer: asyncio.TimerHandle | None = None


class MicroBatcher:
    def __init__(self, run: RunFn, window: float = 0.001, max_batch: int = 1024) -> None:
        if window < 0 or max_batch < 1:
            raise ValueError("window must be >= 0 and max_batch >= 1")
        self._run = run
        self._window = window
        self._max = max_batch
        self._groups: dict[Hashable, _Group] = {}
        self.batches_run = 0

    async def submit(self, queries: np.ndarray, key: Hashable) -> tuple[Any, ...]:
        if self._window == 0 or queries.shape[0] >= self._max:
            self.batches_run += 1
            return await self._run(queries, key)
        loop = asyncio.get_running_loop()
        fut: asyncio.Future = loop.create_future()
        group = self._groups.setdefault(key, _Group())
        group.parts.append((queries, fut))
        group.rows += queries.shape[0]
        if group.rows >= self._max:
            self._flush(key)
        elif group.timer is None:
            group.timer = loop.call_later(self._window, self._flush, key)
        return await fut

    def _flush(self, key: Hashable) -> None:
        group = self._groups.pop(key, None)
        if group is None:
            return
        if group.timer is not None:
            group.timer.cancel()
        asyncio.ensure_future(self._execute(group, key))

    async def _execute(self, group: _Group, key: Hashable) -> None:
        self.batches_run += 1
        try:
            merged = np.concatenate([q for q, _ in group.parts]) if len(group.parts) > 1 else group.parts[0][0]
            results = await self._run(merged, key)
        except Exception as exc:  # noqa: BLE001 - every caller of the batch gets the error
            for _, fut in group.parts:
                if not fut.done():
                    fut.set_exception(exc)
            return
        start = 0
        for q, fut in group.parts:
            n = q.shape[0]
            if not fut.done():
                fut.set_result(tuple(r[start:start + n] for r in results))
            start += n
