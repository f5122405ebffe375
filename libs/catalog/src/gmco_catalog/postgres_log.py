"""The catalogue log in PostgreSQL through a psycopg ``AsyncConnectionPool`` (see ``log`` for the ordering
guarantee: one transaction-scoped advisory lock orders the writers, so the committed log is a gap-free
prefix, and LISTEN/NOTIFY only wakes readers early)."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Self

import psycopg
from gmco_common.errors import Unavailable
from gmco_common.ids import from_int64
from gmco_common.migrations import load_migrations, migrate_postgres
from psycopg_pool import AsyncConnectionPool

from gmco_catalog.log import (
    AppendResult,
    LogEntry,
    ReadResult,
    Upserts,
    Write,
    check_writes,
    columns_of,
    parse_op,
)

# Arbitrary constant naming the writers' advisory lock.
_WRITER_LOCK = 0x474D434F  # "GMCO"
_SCHEMA_LOCK = _WRITER_LOCK + 1  # serialises migrations
_CHANNEL = "gmco_catalog_log"


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
            # Processes that start together would race on CREATE ... IF NOT EXISTS (a unique violation in
            # the catalog); the migration runner applies them one at a time, under an advisory lock.
            async with self._pool.connection() as conn:
                await migrate_postgres(conn, load_migrations("gmco_catalog", "postgres"), _SCHEMA_LOCK)
        except (psycopg.OperationalError, TimeoutError) as exc:
            raise Unavailable(f"catalogue log database unreachable: {exc.__class__.__name__}") from exc

    async def close(self) -> None:
        if self._listener is not None:
            await self._listener.close()
            self._listener = None
        await self._pool.close()

    async def append(self, writes: Sequence[Write] | Upserts, request_id: str | None = None) -> AppendResult:
        check_writes(writes)
        c = columns_of(writes)
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
                    (c.slots, c.ops, c.media_ids, c.vectors, c.attributes),
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
            LogEntry(r[1], r[2], parse_op(r[3]), from_int64(r[4]), r[5], r[6]) for r in rows if r[1] is not None
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
