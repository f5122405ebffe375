"""A replica's place in the catalogue log: the tailer that applies its slots' entries, started once the
initial data is loaded (it resumes from the loaded ``applied_lsn``), and read-your-writes waits."""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Sequence

from gmco_catalog.log import CatalogLog, LogEntry
from gmco_catalog.tailer import LogTailer

from gmco_shard.apply import apply_entries
from gmco_shard.store import ShardStore

BULK_WINDOW_SECONDS = 0.5  # the apply rate is measured over this long
BULK_HOLD_SECONDS = 2.0  # builds wait until a burst has been over for this long


class Replication:
    """``bulk_rate``: entries/s applied over the last ``BULK_WINDOW_SECONDS`` from which the replica is in a
    bulk catch-up and defers index builds until the burst has been over for ``BULK_HOLD_SECONDS`` (0 = never
    defer; ShardStore.defer_builds_until)."""

    def __init__(self, catalog: CatalogLog, slots: Sequence[int], store: ShardStore, bulk_rate: float = 0.0) -> None:
        self._catalog = catalog
        self._slots = list(slots)
        self._store = store
        self._tailer: LogTailer | None = None
        self._bulk_rate = bulk_rate
        self._recent: deque[tuple[float, int]] = deque()

    async def _apply(self, entries: list[LogEntry], scanned_lsn: int) -> None:
        await asyncio.to_thread(apply_entries, self._store, entries, scanned_lsn)
        if self._bulk_rate > 0 and entries:
            now = time.monotonic()
            self._recent.append((now, len(entries)))
            while self._recent[0][0] < now - BULK_WINDOW_SECONDS:
                self._recent.popleft()
            if sum(n for _, n in self._recent) >= self._bulk_rate * BULK_WINDOW_SECONDS:
                self._store.defer_builds_until = now + BULK_HOLD_SECONDS

    async def run(self) -> None:
        """Tail the log for the life of the replica (a must-run task: the supervisor restarts it)."""
        if self._tailer is None:
            self._tailer = LogTailer(self._catalog, self._slots, self._apply, self._store.applied_lsn)
        await self._tailer.run()

    @property
    def lag_entries(self) -> int:
        return self._tailer.lag_entries if self._tailer else 0

    @property
    def lag_seconds(self) -> float:
        return self._tailer.lag_seconds if self._tailer else 0.0

    async def wait_for(self, lsn: int, timeout: float | None) -> bool:
        """Wait until the store has applied ``lsn``; False when ``timeout`` passes first."""
        if self._tailer is not None:
            return await self._tailer.wait_for(lsn, timeout)
        deadline = time.monotonic() + (timeout or 0.0)
        while self._store.applied_lsn < lsn and time.monotonic() < deadline:
            await asyncio.sleep(0.005)
        return self._store.applied_lsn >= lsn
