"""The catalogue change log.

Every catalogue write is appended here first and acknowledged only after it has committed; the reply
carries its ``lsn``. Shard replicas are derived state: each tails the entries of its own slots in
``lsn`` order (see :mod:`gmco_catalog.tailer`).

Ordering guarantee. Writers take one transaction-scoped advisory lock (PostgreSQL) or the database
write lock (SQLite) before they draw ``lsn`` values, so transactions commit in ``lsn`` order and the
committed log is always a gap-free prefix. A reader that sees ``head`` has seen every entry
``<= head``; polling by ``lsn`` therefore never misses an entry, and LISTEN/NOTIFY only wakes readers
early.
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from enum import IntEnum
from pathlib import Path
from typing import Protocol, Self

import psycopg
from gmco_common.errors import InvalidArgument, Unavailable
from gmco_common.slots import slot_of
from psycopg_pool import AsyncConnectionPool

# Arbitrary constant naming the writers' advisory lock.
_WRITER_LOCK = 0x474D434F  # "GMCO"
_SCHEMA_LOCK = _WRITER_LOCK + 1  # serialises schema creation
_CHANNEL = "gmco_catalog_log"
_I64 = 1 << 63


class Op(IntEnum):
    UPSERT = 1
    DELETE = 2


@dataclass(frozen=True)
class Write:
    """One change to append. ``vector`` is FP16 little-endian bytes; ``attributes`` MediaAttributes bytes."""

    op: Op
    media_id: int
    vector: bytes | None = None
    attributes: bytes | None = None


@dataclass(frozen=True)
class LogEntry:
    lsn: int
    slot: int
    op: Op
    media_id: int
    vector: bytes | None
    attributes: bytes | None


@dataclass(frozen=True)
class AppendResult:
    first_lsn: int
    last_lsn: int
    # True when request_id had already been appended: nothing was written this time.
    duplicate: bool = False


@dataclass(frozen=True)
class ReadResult:
    entries: list[LogEntry]
    # Every entry of the requested slots with lsn <= scanned_lsn has been returned (now or before).
    scanned_lsn: int
    head_lsn: int


class CatalogLog(Protocol):
    async def append(self, writes: Sequence[Write], request_id: str | None = None) -> AppendResult: ...
    async def read(self, after_lsn: int, slots: Sequence[int] | None, limit: int) -> ReadResult: ...
    async def head_lsn(self) -> int: ...
    async def wait_for_change(self, after_lsn: int, timeout: float) -> None: ...
    async def close(self) -> None: ...


def _to_i64(media_id: int) -> int:
    return media_id - (1 << 64) if media_id >= _I64 else media_id


def _from_i64(value: int) -> int:
    return value + (1 << 64) if value < 0 else value


def _check(writes: Sequence[Write]) -> None:
    if not writes:
        raise InvalidArgument("items", "the batch is empty")
    for i, w in enumerate(writes):
        if w.op == Op.UPSERT and not w.vector:
            raise InvalidArgument(f"items[{i}].vector", "an upsert needs a vector")


_PG_SCHEMA = """
CREATE TABLE IF NOT EXISTS catalog_log (
    lsn BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    slot INTEGER NOT NULL,
    op SMALLINT NOT NULL,
    media_id BIGINT NOT NULL,
    vector BYTEA,
    attributes BYTEA,
    created_at TIMESTAMPTZ NOT NULL DEFAULT now()
);
CREATE INDEX IF NOT EXISTS catalog_log_slot_lsn ON catalog_log (slot, lsn);
CREATE TABLE IF NOT EXISTS catalog_requests (
    request_id TEXT PRIMARY KEY,
    first_lsn BIGINT NOT NULL DEFAULT 0,
    last_lsn BIGINT NOT NULL DEFAULT 0
);
"""


class PostgresCatalogLog:
    """The log in PostgreSQL through an ``AsyncConnectionPool``."""

    def __init__(self, dsn: str, min_size: int = 1, max_size: int = 8, timeout: float = 5.0) -> None:
        self._dsn = dsn
        self._timeout = timeout
        self._pool = AsyncConnectionPool(dsn, min_size=min_size, max_size=max_size, open=False, timeout=timeout,
                                         kwargs={"autocommit": True, "connect_timeout": max(1, int(timeout))})
        self._listener: psycopg.AsyncConnection | None = None

    async def __aenter__(self) -> Self:
        await self.open()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def open(self) -> None:
        await self._pool.open(wait=False)
        try:
            # Processes that start together race on CREATE ... IF NOT EXISTS (a unique violation
            # in the catalog); one at a time, under a transaction-scoped advisory lock.
            async with self._pool.connection() as conn, conn.transaction():
                await conn.execute("SELECT pg_advisory_xact_lock(%s)", (_SCHEMA_LOCK,))
                await conn.execute(_PG_SCHEMA)
        except (psycopg.OperationalError, TimeoutError) as exc:
            raise Unavailable(f"catalogue log database unreachable: {exc.__class__.__name__}") from exc

    async def close(self) -> None:
        if self._listener is not None:
            await self._listener.close()
            self._listener = None
        await self._pool.close()

    async def append(self, writes: Sequence[Write], request_id: str | None = None) -> AppendResult:
        _check(writes)
        try:
            async with self._pool.connection() as conn, conn.transaction():
                if request_id:
                    cur = await conn.execute(
                        "INSERT INTO catalog_requests (request_id) VALUES (%s) ON CONFLICT DO NOTHING RETURNING 1",
                        (request_id,),
                    )
                    if await cur.fetchone() is None:
                        cur = await conn.execute(
                            "SELECT first_lsn, last_lsn FROM catalog_requests WHERE request_id = %s", (request_id,)
                        )
                        first, last = await cur.fetchone()  # type: ignore[misc]
                        return AppendResult(first, last, duplicate=True)
                await conn.execute("SELECT pg_advisory_xact_lock(%s)", (_WRITER_LOCK,))
                cur = await conn.execute(
                    "INSERT INTO catalog_log (slot, op, media_id, vector, attributes) "
                    "SELECT s, o, m, v, a FROM unnest(%s::int[], %s::smallint[], %s::bigint[], %s::bytea[], %s::bytea[]) "
                    "WITH ORDINALITY AS t(s, o, m, v, a, n) ORDER BY n RETURNING lsn",
                    (
                        [slot_of(w.media_id) for w in writes],
                        [int(w.op) for w in writes],
                        [_to_i64(w.media_id) for w in writes],
                        [w.vector for w in writes],
                        [w.attributes for w in writes],
                    ),
                )
                lsns = [r[0] for r in await cur.fetchall()]
                first, last = min(lsns), max(lsns)
                if request_id:
                    await conn.execute(
                        "UPDATE catalog_requests SET first_lsn = %s, last_lsn = %s WHERE request_id = %s",
                        (first, last, request_id),
                    )
                await conn.execute(f"SELECT pg_notify('{_CHANNEL}', %s)", (str(last),))
        except (psycopg.OperationalError, psycopg.errors.AdminShutdown, TimeoutError) as exc:
            # Not acknowledged: the transaction did not commit (or we cannot know, and the caller retries
            # with the same request_id, which makes the retry safe).
            raise Unavailable("catalogue log database unavailable; retry with the same request_id") from exc
        return AppendResult(first, last)

    async def read(self, after_lsn: int, slots: Sequence[int] | None, limit: int) -> ReadResult:
        slot_clause = "AND slot = ANY(%(slots)s)" if slots is not None else ""
        query = (
            "WITH h AS (SELECT coalesce(max(lsn), 0) AS head FROM catalog_log) "
            "SELECT h.head, e.lsn, e.slot, e.op, e.media_id, e.vector, e.attributes FROM h LEFT JOIN LATERAL ("
            "  SELECT lsn, slot, op, media_id, vector, attributes FROM catalog_log"
            f"  WHERE lsn > %(after)s AND lsn <= h.head {slot_clause} ORDER BY lsn LIMIT %(limit)s"
            ") e ON true ORDER BY e.lsn"
        )
        try:
            async with self._pool.connection() as conn:
                cur = await conn.execute(query, {"after": after_lsn, "slots": list(slots or []), "limit": limit})
                rows = await cur.fetchall()
        except (psycopg.OperationalError, TimeoutError) as exc:
            raise Unavailable("catalogue log database unavailable") from exc
        head = rows[0][0] if rows else 0
        entries = [
            LogEntry(r[1], r[2], Op(r[3]), _from_i64(r[4]), r[5], r[6]) for r in rows if r[1] is not None
        ]
        scanned = entries[-1].lsn if len(entries) == limit else max(head, after_lsn)
        return ReadResult(entries, scanned, head)

    async def head_lsn(self) -> int:
        try:
            async with self._pool.connection() as conn:
                cur = await conn.execute("SELECT coalesce(max(lsn), 0) FROM catalog_log")
                return (await cur.fetchone())[0]  # type: ignore[index]
        except (psycopg.OperationalError, TimeoutError) as exc:
            raise Unavailable("catalogue log database unavailable") from exc

    async def wait_for_change(self, after_lsn: int, timeout: float) -> None:
        """Return on a NOTIFY or after ``timeout``; callers poll by lsn either way."""
        try:
            if self._listener is None or self._listener.closed:
                self._listener = await psycopg.AsyncConnection.connect(self._dsn, autocommit=True,
                                                                       connect_timeout=max(1, int(self._timeout)))
                await self._listener.execute(f"LISTEN {_CHANNEL}")
            async for _note in self._listener.notifies(timeout=timeout, stop_after=1):
                return
        except (psycopg.OperationalError, TimeoutError):
            self._listener = None
            await asyncio.sleep(min(timeout, 0.5))


class SqliteCatalogLog:
    """The embedded log: one SQLite file in WAL mode, written from one thread at a time."""

    def __init__(self, path: Path | str, poll_interval: float = 0.05) -> None:
        self._path = str(path)
        self._poll = poll_interval
        self._lock = threading.Lock()
        self._conn: sqlite3.Connection | None = None

    async def __aenter__(self) -> Self:
        await self.open()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def _db(self) -> sqlite3.Connection:
        if self._conn is None:
            conn = sqlite3.connect(self._path, check_same_thread=False, isolation_level=None, timeout=30)
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=FULL")
            conn.executescript(
                """
                CREATE TABLE IF NOT EXISTS catalog_log (
                    lsn INTEGER PRIMARY KEY AUTOINCREMENT, slot INTEGER NOT NULL, op INTEGER NOT NULL,
                    media_id INTEGER NOT NULL, vector BLOB, attributes BLOB);
                CREATE TABLE IF NOT EXISTS catalog_requests (
                    request_id TEXT PRIMARY KEY, first_lsn INTEGER NOT NULL, last_lsn INTEGER NOT NULL);
                """
            )
            self._conn = conn
        return self._conn

    async def _run(self, fn, *args):
        def locked():
            with self._lock:
                return fn(self._db(), *args)

        return await asyncio.to_thread(locked)

    async def open(self) -> None:
        await self._run(lambda db: None)

    async def close(self) -> None:
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None

    async def append(self, writes: Sequence[Write], request_id: str | None = None) -> AppendResult:
        _check(writes)
        rows = [(slot_of(w.media_id), int(w.op), _to_i64(w.media_id), w.vector, w.attributes) for w in writes]

        def txn(db: sqlite3.Connection) -> AppendResult:
            db.execute("BEGIN IMMEDIATE")
            try:
                if request_id:
                    got = db.execute("SELECT first_lsn, last_lsn FROM catalog_requests WHERE request_id = ?",
                                     (request_id,)).fetchone()
                    if got:
                        db.execute("ROLLBACK")
                        return AppendResult(got[0], got[1], duplicate=True)
                first = last = 0
                for row in rows:
                    cur = db.execute(
                        "INSERT INTO catalog_log (slot, op, media_id, vector, attributes) VALUES (?, ?, ?, ?, ?)", row
                    )
                    last = cur.lastrowid or 0
                    first = first or last
                if request_id:
                    db.execute("INSERT INTO catalog_requests VALUES (?, ?, ?)", (request_id, first, last))
                db.execute("COMMIT")
                return AppendResult(first, last)
            except BaseException:
                db.execute("ROLLBACK")
                raise

        try:
            return await self._run(txn)
        except sqlite3.OperationalError as exc:
            raise Unavailable("catalogue log database busy or unavailable; retry") from exc

    async def read(self, after_lsn: int, slots: Sequence[int] | None, limit: int) -> ReadResult:
        def q(db: sqlite3.Connection) -> ReadResult:
            db.execute("BEGIN")
            try:
                head = db.execute("SELECT coalesce(max(lsn), 0) FROM catalog_log").fetchone()[0]
                sql = "SELECT lsn, slot, op, media_id, vector, attributes FROM catalog_log WHERE lsn > ? AND lsn <= ?"
                params: list = [after_lsn, head]
                if slots is not None:
                    sql += " AND slot IN (SELECT value FROM json_each(?))"
                    params.append(json.dumps(list(slots)))
                rows = db.execute(sql + " ORDER BY lsn LIMIT ?", (*params, limit)).fetchall()
            finally:
                db.execute("COMMIT")
            entries = [LogEntry(r[0], r[1], Op(r[2]), _from_i64(r[3]), r[4], r[5]) for r in rows]
            scanned = entries[-1].lsn if len(entries) == limit else max(head, after_lsn)
            return ReadResult(entries, scanned, head)

        return await self._run(q)

    async def head_lsn(self) -> int:
        return await self._run(lambda db: db.execute("SELECT coalesce(max(lsn), 0) FROM catalog_log").fetchone()[0])

    async def wait_for_change(self, after_lsn: int, timeout: float) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while loop.time() < deadline:
            if await self.head_lsn() > after_lsn:
                return
            await asyncio.sleep(min(self._poll, max(0.0, deadline - loop.time())))


def open_log(url: str) -> CatalogLog:
    """``postgresql://...`` → PostgreSQL; ``sqlite:///path`` or a plain path → SQLite."""
    if url.startswith(("postgresql://", "postgres://")):
        return PostgresCatalogLog(url)
    return SqliteCatalogLog(url.removeprefix("sqlite://"))
