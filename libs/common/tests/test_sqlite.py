"""The SQLite worker every embedded store uses."""

from __future__ import annotations

import sqlite3
import threading
import time

import pytest
from gmco_common.errors import Unavailable
from gmco_common.sqlite import SqliteWorker


def _hold_write_lock(path, seconds: float) -> threading.Thread:
    """Another connection holds the write lock of a rollback-journal file for ``seconds``, as a process
    opening the same new file a moment earlier does while it sets it up."""
    other = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    other.execute("CREATE TABLE t (x)")
    other.execute("BEGIN IMMEDIATE")
    other.execute("INSERT INTO t VALUES (1)")

    def release() -> None:
        time.sleep(seconds)
        other.execute("COMMIT")
        other.close()

    thread = threading.Thread(target=release)
    thread.start()
    return thread


async def test_opening_a_file_another_connection_has_locked_waits_for_it(tmp_path) -> None:
    # SQLite refuses "PRAGMA journal_mode=WAL" at once while the lock is held, busy timeout or not;
    # without the worker's retry this open failed in under a millisecond.
    path = tmp_path / "shared.sqlite3"
    holder = _hold_write_lock(path, 0.3)
    start = time.monotonic()
    async with SqliteWorker(path, "test", busy_timeout=5.0) as worker:
        mode = await worker.call(lambda db: db.execute("PRAGMA journal_mode").fetchone()[0])
    holder.join()
    assert mode == "wal"
    assert time.monotonic() - start >= 0.25


async def test_a_lock_held_past_the_busy_timeout_is_unavailable(tmp_path) -> None:
    path = tmp_path / "shared.sqlite3"
    holder = _hold_write_lock(path, 1.0)
    with pytest.raises(Unavailable, match="database is locked"):
        async with SqliteWorker(path, "test", busy_timeout=0.2):
            pass
    holder.join()
