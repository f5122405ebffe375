"""The one way the embedded stores use SQLite: a connection owned by one dedicated thread.

Blocking ``sqlite3`` calls never run on the event loop; running them all on one thread serialises writes
by construction (no ``database is locked`` between our own calls) and keeps transactions on the thread
that opened them. ``synchronous=FULL`` in WAL mode: a commit that returned survives a power cut.
A failure of the database (locked by another process, disk full, I/O error) is :class:`Unavailable`:
nothing was acknowledged, and the caller may retry.
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import TracebackType
from typing import Self, TypeVar

from gmco_common.errors import Unavailable

log = logging.getLogger(__name__)
T = TypeVar("T")


class SqliteWorker:
    """``await worker.call(fn, *args)`` runs ``fn(connection, *args)`` on the worker's thread."""

    def __init__(self, path: Path | str, name: str, setup: Callable[[sqlite3.Connection], None] | None = None,
                 busy_timeout: float = 5.0, page_size: int | None = None) -> None:
        self._path = str(path)
        self._page_size = page_size
        self._name = name
        self._setup = setup
        self._busy_timeout = busy_timeout
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"sqlite-{name}")
        self._conn: sqlite3.Connection | None = None

    async def __aenter__(self) -> Self:
        try:
            await self.call(lambda _db: None)
        except BaseException:
            await self.close()
            raise
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.close()

    def _db(self) -> sqlite3.Connection:
        if self._conn is None:
            if self._path != ":memory:":
                Path(self._path).parent.mkdir(parents=True, exist_ok=True)
            conn = sqlite3.connect(self._path, isolation_level=None, check_same_thread=False,
                                   timeout=self._busy_timeout)
            if self._page_size is not None:
                # Only takes effect on a new, empty database (before WAL mode is set); an existing file keeps its own.
                conn.execute(f"PRAGMA page_size={int(self._page_size)}")
            _set_wal(conn, self._busy_timeout)
            conn.execute("PRAGMA synchronous=FULL")
            if self._setup is not None:
                try:
                    self._setup(conn)
                except BaseException:
                    conn.close()
                    raise
            self._conn = conn
        return self._conn

    async def call(self, fn: Callable[..., T], *args: object) -> T:
        def run() -> T:
            return fn(self._db(), *args)

        try:
            return await asyncio.get_running_loop().run_in_executor(self._executor, run)
        except sqlite3.OperationalError as exc:
            log.warning("SQLite %s unavailable: %s", self._name, exc)
            raise Unavailable(f"the {self._name} database is unavailable ({exc}); retry with backoff") from exc

    async def close(self) -> None:
        def shut() -> None:
            if self._conn is not None:
                self._conn.close()
                self._conn = None

        await asyncio.get_running_loop().run_in_executor(self._executor, shut)
        self._executor.shutdown(wait=True)


def _set_wal(conn: sqlite3.Connection, timeout: float) -> None:
    """``PRAGMA journal_mode=WAL``, retried for up to ``timeout`` seconds while the file is locked.

    SQLite answers this pragma "database is locked" at once, without waiting out the busy timeout, while
    another connection holds a lock it needs: several processes opening one new file together (the local
    stack's routers and shards at start) failed so, 2 of 120 opens in a test of 8 at once."""
    deadline = time.monotonic() + timeout
    pause = 0.01
    while True:
        try:
            conn.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() + pause > deadline:
                raise
        time.sleep(pause)
        pause = min(2 * pause, 0.2)


def transaction(db: sqlite3.Connection, body: Callable[[sqlite3.Connection], T], immediate: bool = True) -> T:
    """Run ``body`` in one transaction (``BEGIN IMMEDIATE`` takes the write lock up front)."""
    db.execute("BEGIN IMMEDIATE" if immediate else "BEGIN")
    try:
        result = body(db)
    except BaseException:
        if db.in_transaction:
            db.execute("ROLLBACK")
        raise
    if db.in_transaction:
        db.execute("COMMIT")
    return result
