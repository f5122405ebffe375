"""PostgreSQL store: psycopg 3 with ``psycopg_pool.AsyncConnectionPool``.

A feedback batch costs one round trip to read every touched user's state and which of the batch's
event ids are already logged (pipelined), then one statement per user, in autocommit (so one implicit
transaction), that inserts the user's new events with ``ON CONFLICT (event_id) DO NOTHING`` and
writes the new state only if the stored version is still the one the update was computed from
(optimistic concurrency). If another writer got there first -- the version moved or an event id was
inserted meanwhile -- ``rl_state_assert_applied`` raises ``serialization_failure``, the statement and
its inserts roll back, and tenacity retries that user with fresh state. Broken connections (a restarted
server) are retried the same way; a server that stays down becomes UNAVAILABLE.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from types import TracebackType
from typing import Self, TypeVar

import psycopg
from gmco_common.context import call_timeout
from gmco_common.errors import Unavailable
from psycopg.conninfo import conninfo_to_dict
from psycopg_pool import AsyncConnectionPool, PoolTimeout
from tenacity import (
    AsyncRetrying,
    retry_if_exception,
    stop_after_attempt,
    stop_after_delay,
    wait_random_exponential,
)

from gmco_rl_state.migrate import MIGRATIONS_TABLE, load_migrations, pending
from gmco_rl_state.model import Event, StateRow
from gmco_rl_state.store import FINGERPRINT_KEY, ApplyFn, UserOutcome, check_fingerprint, to_int64

log = logging.getLogger(__name__)

T = TypeVar("T")

_MIGRATION_LOCK = 0x676D636F_726C  # pg_advisory_xact_lock key: one migrator at a time

_READ_STATES = """
SELECT user_id, version, event_count, pref, bandit_a, bandit_b, seen
FROM user_state WHERE user_id = ANY(%s)
"""
_READ_KNOWN = "SELECT event_id FROM feedback_event WHERE event_id = ANY(%s)"
_WRITE = """
WITH ins AS (
    INSERT INTO feedback_event
        (event_id, user_id, media_id, reward, event_ts_ms, surface, region, device, propensity, has_vector)
    SELECT e.event_id, %(user_id)s, e.media_id, e.reward, e.ts, e.surface, e.region, e.device,
           e.propensity, e.has_vector
    FROM unnest(%(event_ids)s::text[], %(media_ids)s::bigint[], %(rewards)s::real[], %(ts)s::bigint[],
                %(surfaces)s::smallint[], %(regions)s::text[], %(devices)s::text[],
                %(propensities)s::real[], %(has_vectors)s::boolean[])
         AS e(event_id, media_id, reward, ts, surface, region, device, propensity, has_vector)
    ON CONFLICT (event_id) DO NOTHING
    RETURNING 1
), st AS (
    INSERT INTO user_state AS s (user_id, version, event_count, pref, bandit_a, bandit_b, seen)
    VALUES (%(user_id)s, %(version)s, %(event_count)s, %(pref)s, %(bandit_a)s, %(bandit_b)s, %(seen)s)
    ON CONFLICT (user_id) DO UPDATE
        SET version = EXCLUDED.version, event_count = EXCLUDED.event_count, pref = EXCLUDED.pref,
            bandit_a = EXCLUDED.bandit_a, bandit_b = EXCLUDED.bandit_b, seen = EXCLUDED.seen,
            updated_at = now()
        WHERE s.version = %(expected)s
    RETURNING 1
)
SELECT rl_state_assert_applied((SELECT count(*) FROM ins) = %(n)s AND (SELECT count(*) FROM st) = 1)
"""


def _transient(exc: BaseException) -> bool:
    """Worth retrying now: serialisation failures, deadlocks and broken connections, not a pool timeout."""
    return isinstance(exc, psycopg.OperationalError) and not isinstance(exc, PoolTimeout)


def describe_dsn(dsn: str) -> str:
    """host:port/dbname of a DSN, without credentials, for messages."""
    parts = conninfo_to_dict(dsn)
    return f"{parts.get('host', 'localhost')}:{parts.get('port', 5432)}/{parts.get('dbname', '')}"


class PostgresStore:
    def __init__(self, dsn: str, fingerprint: str, min_size: int = 2, max_size: int = 10,
                 timeout: float = 2.0) -> None:
        self._dsn = dsn
        self._fingerprint = fingerprint
        self._max_size = max_size
        self._timeout = timeout
        self._pool = AsyncConnectionPool(
            dsn, min_size=min_size, max_size=max_size, timeout=timeout, open=False, name="rl_state",
            kwargs={"autocommit": True, "connect_timeout": 5},
        )

    async def __aenter__(self) -> Self:
        try:
            await self._pool.open(wait=True, timeout=30)
            await self._run(self._migrate)
        except (psycopg.OperationalError, Unavailable) as exc:
            await self._pool.close()
            raise RuntimeError(
                f"cannot use PostgreSQL at {describe_dsn(self._dsn)}: {exc}. Check "
                "GMCO_RL_STATE_POSTGRES_DSN and that the server is up"
            ) from exc
        except BaseException:
            await self._pool.close()
            raise
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self._pool.close()

    # ----------------------------------------------------------------------------------------------
    @asynccontextmanager
    async def _connection(self, timeout: float | None = None) -> AsyncIterator[psycopg.AsyncConnection]:
        async with self._pool.connection(timeout=call_timeout(timeout or self._timeout)) as conn:
            yield conn

    async def _run(self, op: Callable[[], Awaitable[T]]) -> T:
        """Run ``op`` with retries on transient errors; what stays broken becomes Unavailable."""
        retrying = AsyncRetrying(
            retry=retry_if_exception(_transient),
            stop=stop_after_attempt(10) | stop_after_delay(2 * self._timeout),
            wait=wait_random_exponential(multiplier=0.005, max=0.25),
            reraise=True,
        )
        try:
            async for attempt in retrying:
                with attempt:
                    return await op()
        except psycopg.errors.TransactionRollback as exc:
            raise Unavailable("too much contention on one user's state; retry") from exc
        except psycopg.OperationalError as exc:
            log.warning("PostgreSQL unavailable: %s", exc)
            raise Unavailable("the state database is unavailable; retry with backoff") from exc
        raise AssertionError("unreachable: tenacity either returns or raises")

    async def _migrate(self) -> None:
        async with self._connection(30) as conn, conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock(%s)", (_MIGRATION_LOCK,))
            await conn.execute(
                f"CREATE TABLE IF NOT EXISTS {MIGRATIONS_TABLE} (version integer PRIMARY KEY, "
                "name text NOT NULL, applied_at timestamptz NOT NULL DEFAULT now())"
            )
            cur = await conn.execute(f"SELECT version FROM {MIGRATIONS_TABLE}")
            applied = {v for (v,) in await cur.fetchall()}
            for migration in pending(load_migrations("postgres"), applied):
                log.info("applying migration %04d_%s", migration.version, migration.name)
                await conn.execute(migration.sql)  # no parameters: several statements are allowed
                await conn.execute(f"INSERT INTO {MIGRATIONS_TABLE} (version, name) VALUES (%s, %s)",
                                   (migration.version, migration.name))
            await conn.execute("INSERT INTO model_meta (key, value) VALUES (%s, %s) ON CONFLICT DO NOTHING",
                               (FINGERPRINT_KEY, self._fingerprint))
            cur = await conn.execute("SELECT value FROM model_meta WHERE key = %s", (FINGERPRINT_KEY,))
            row = await cur.fetchone()
        assert row is not None
        check_fingerprint(row[0], self._fingerprint)

    # ----------------------------------------------------------------------------------------------
    async def get(self, user_id: str, timeout: float | None) -> StateRow | None:
        async def read() -> StateRow | None:
            async with self._connection(timeout) as conn:
                cur = await conn.execute(_READ_STATES, ([user_id],))
                row = await cur.fetchone()
            return None if row is None else StateRow(*row)

        return await self._run(read)

    async def _read(self, users: list[str], event_ids: list[str]) -> tuple[dict[str, StateRow], set[str]]:
        """States of ``users`` and which of ``event_ids`` are logged already: one pipelined round trip."""
        async with self._connection() as conn:
            async with conn.pipeline():
                states = await conn.execute(_READ_STATES, (users,))
                known = await conn.execute(_READ_KNOWN, (event_ids,))
            rows = {r[0]: StateRow(*r) for r in await states.fetchall()}
            return rows, {r[0] for r in await known.fetchall()}

    async def record(self, groups: Mapping[str, Sequence[Event]], apply: ApplyFn) -> dict[str, UserOutcome]:
        ids = [e.event_id for events in groups.values() for e in events]
        rows, known = await self._run(lambda: self._read(list(groups), ids))
        limit = asyncio.Semaphore(self._max_size)

        async def one(user: str) -> tuple[str, UserOutcome]:
            async with limit:
                return user, await self._record_user(user, groups[user], rows.get(user), known, apply)

        results = await asyncio.gather(*(one(u) for u in groups), return_exceptions=True)
        for result in results:
            if isinstance(result, BaseException):
                raise result
        return dict(results)  # type: ignore[arg-type]

    async def _record_user(self, user: str, events: Sequence[Event], row: StateRow | None, known: set[str],
                           apply: ApplyFn) -> UserOutcome:
        prefetched = True

        async def attempt() -> UserOutcome:
            nonlocal prefetched, row, known
            if not prefetched:  # a retry: somebody else wrote; start again from what is stored now
                rows, known = await self._read([user], [e.event_id for e in events])
                row = rows.get(user)
            prefetched = False
            new = [e for e in events if e.event_id not in known]
            current = 0 if row is None else row.version
            if not new:
                return UserOutcome(current, 0, len(events))
            updated = await asyncio.get_running_loop().run_in_executor(None, apply, row, user, new)
            await self._write(updated, current, new)
            return UserOutcome(updated.version, len(new), len(events) - len(new))

        return await self._run(attempt)

    async def _write(self, row: StateRow, expected: int, events: Sequence[Event]) -> None:
        params = {
            "user_id": row.user_id,
            "event_ids": [e.event_id for e in events],
            "media_ids": [to_int64(e.media_id) for e in events],
            "rewards": [e.reward for e in events],
            "ts": [e.timestamp_ms for e in events],
            "surfaces": [e.surface for e in events],
            "regions": [e.region for e in events],
            "devices": [e.device for e in events],
            "propensities": [e.propensity for e in events],
            "has_vectors": [e.vector is not None for e in events],
            "version": row.version,
            "event_count": row.event_count,
            "pref": row.pref,
            "bandit_a": row.bandit_a,
            "bandit_b": row.bandit_b,
            "seen": row.seen,
            "expected": expected,
            "n": len(events),
        }
        async with self._connection() as conn:
            await conn.execute(_WRITE, params)
