"""A replica's log follower: reads its slots' entries in ``lsn`` order and applies them.

It polls by ``lsn`` (the source of truth) and sleeps on LISTEN/NOTIFY (or a short poll) between
reads, so no entry is missed even when a notification is. When the log is unreachable it backs off
and keeps the replica serving what it has; the growing lag is visible in ``lag_entries``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Sequence

from gmco_common.errors import Unavailable

from gmco_catalog.log import CatalogLog, LogEntry

log = logging.getLogger(__name__)

# apply(entries, scanned_lsn): apply entries in order, then record scanned_lsn as applied.
ApplyFn = Callable[[list[LogEntry], int], Awaitable[None]]


class LogTailer:
    def __init__(self, catalog: CatalogLog, slots: Sequence[int] | None, apply: ApplyFn, start_lsn: int,
                 batch_size: int = 2000, idle_wait: float = 0.5) -> None:
        self._log = catalog
        self._slots = list(slots) if slots is not None else None
        self._apply = apply
        self.applied_lsn = start_lsn
        self.head_lsn = start_lsn
        self._batch = batch_size
        self._idle_wait = idle_wait
        self._caught_up_at = time.monotonic()
        self._changed = asyncio.Condition()
        self.connected = False

    @property
    def lag_entries(self) -> int:
        return max(0, self.head_lsn - self.applied_lsn)

    @property
    def lag_seconds(self) -> float:
        return 0.0 if self.lag_entries == 0 else time.monotonic() - self._caught_up_at

    async def step(self) -> bool:
        """Read and apply one batch; True when more may be waiting."""
        result = await self._log.read(self.applied_lsn, self._slots, self._batch)
        self.connected = True
        self.head_lsn = max(self.head_lsn, result.head_lsn)
        if result.entries or result.scanned_lsn > self.applied_lsn:
            await self._apply(result.entries, result.scanned_lsn)
            self.applied_lsn = result.scanned_lsn
            async with self._changed:
                self._changed.notify_all()
        if self.applied_lsn >= self.head_lsn:
            self._caught_up_at = time.monotonic()
            return False
        return True

    async def run(self) -> None:
        backoff = 0.1
        while True:
            try:
                if not await self.step():
                    await self._log.wait_for_change(self.applied_lsn, self._idle_wait)
                backoff = 0.1
            except Unavailable as exc:
                self.connected = False
                log.warning("catalogue log unavailable (%s); retrying in %.1fs", exc, backoff)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 5.0)

    async def wait_for(self, lsn: int, timeout: float | None) -> bool:
        """Wait until ``applied_lsn >= lsn``; False on timeout."""
        async with self._changed:
            try:
                await asyncio.wait_for(self._changed.wait_for(lambda: self.applied_lsn >= lsn), timeout)
            except TimeoutError:
                return False
        return True
