"""PostgreSQL store: psycopg 3 with ``psycopg_pool.AsyncConnectionPool``.

A feedback batch costs two round trips whatever its size: one pipelined read of every touched user's
state and of which of the batch's event ids are logged already, then one statement (autocommit, so
one transaction) that writes each user's new state only if the stored version is still the one the
update was computed from (optimistic concurrency on the user's row) and logs the events of the users
it wrote with ``INSERT ... ON CONFLICT (event_id) DO NOTHING``. Users that lost a race to another
writer are read again and retried (tenacity, jittered backoff) without redoing the others. Users are
written in sorted order so that concurrent batches lock rows in one order; deadlocks and serialisation
failures are retried too. Broken connections (a restarted server) are retried the same way; a server
that stays down becomes UNAVAILABLE.
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
from gmco_common.ids import to_int64
from gmco_common.migrations import load_migrations, migrate_postgres
from psycopg.conninfo import conninfo_to_dict
from psycopg_pool import AsyncConnectionPool, PoolTimeout
from tenacity import (
    AsyncRetrying,
    retry_if_exception,
    stop_after_attempt,
    stop_after_delay,
    wait_random_exponential,
)

from gmco_rl_state.model import Event, StateRow
from gmco_rl_state.store import FINGERPRINT_KEY, ApplyFn, UserOutcome, check_fingerprint

log = logging.getLogger(__name__)

T = TypeVar("T")

_MIGRATION_LOCK = 0x676D636F_726C  # pg_advisory_xact_lock key: one migrator at a time

_READ_STATES = """
SELECT user_id, version, event_count, pref, bandit_a, bandit_b, seen
FROM user_state WHERE user_id = ANY(%s)
"""
_READ_KNOWN = "SELECT event_id FROM feedback_event WHERE event_id = ANY(%s)"
# Writes each user's new state if its version is still the one the update was computed from, then
# logs the events of the users it wrote. Returns the users written; the others lost a race and are
# retried. If an event of a written user was logged meanwhile (an event id reused across users),
# rl_state_assert_applied rolls the whole statement back.
_WRITE = """
WITH st AS (
    INSERT INTO user_state AS s (user_id, version, event_count, pref, bandit_a, bandit_b, seen)
    SELECT * FROM unnest(%(user_ids)b::text[], %(versions)b::bigint[], %(event_counts)b::bigint[],
                         %(prefs)b::bytea[], %(bandit_as)b::bytea[], %(bandit_bs)b::bytea[], %(seens)b::bytea[])
    ON CONFLICT (user_id) DO UPDATE
        SET version = EXCLUDED.version, event_count = EXCLUDED.event_count, pref = EXCLUDED.pref,
            bandit_a = EXCLUDED.bandit_a, bandit_b = EXCLUDED.bandit_b, seen = EXCLUDED.seen,
            updated_at = now()
        WHERE s.version = EXCLUDED.version - 1
    RETURNING s.user_id
), events AS (
    SELECT * FROM unnest(%(event_ids)b::text[], %(event_users)b::text[], %(media_ids)b::bigint[],
                         %(rewards)b::real[], %(ts)b::bigint[], %(surfaces)b::smallint[], %(regions)b::text[],
                         %(devices)b::text[], %(propensities)b::real[], %(has_vectors)b::boolean[],
                         %(policies)b::text[])
        AS e(event_id, user_id, media_id, reward, event_ts_ms, surface, region, device, propensity, has_vector,
             policy)
    WHERE e.user_id IN (SELECT user_id FROM st)
), ins AS (
    INSERT INTO feedback_event
        (event_id, user_id, media_id, reward, event_ts_ms, surface, region, device, propensity, has_vector,
         policy)
    SELECT * FROM events
    ON CONFLICT (event_id) DO NOTHING
    RETURNING 1
)
SELECT user_id FROM st
WHERE rl_state_assert_applied((SELECT count(*) FROM ins) = (SELECT count(*) FROM events))
"""


class _LostRace(Exception):
    """Some users' versions moved while their update was computed; those users are retried."""


def _transient(exc: BaseException) -> bool:
    """Worth retrying now: lost races, serialisation failures, deadlocks, broken connections; not a pool
    timeout (that already waited)."""
    return isinstance(exc, _LostRace) or (isinstance(exc, psycopg.OperationalError)
                                          and not isinstance(exc, PoolTimeout))


def describe_dsn(dsn: str) -> str:
    """host:port/dbname of a DSN, without credentials, for messages."""
    parts = conninfo_to_dict(dsn)
    return f"{parts.get('host', 'localhost')}:{parts.get('port', 5432)}/{parts.get('dbname', '')}"


class PostgresStore:
    def __init__(self, dsn: str, fingerprint: str, min_size: int = 2, max_size: int = 10,
                 timeout: float = 2.0) -> None:
        self._dsn = dsn
        self._fingerprint = fingerprint
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
            stop=stop_after_attempt(20) | stop_after_delay(2 * self._timeout),
            wait=wait_random_exponential(multiplier=0.005, max=0.25),
            reraise=True,
        )
        try:
            async for attempt in retrying:
                with attempt:
                    return await op()
        except (_LostRace, psycopg.errors.TransactionRollback) as exc:
            raise Unavailable("too much contention on one user's state; retry") from exc
        except psycopg.OperationalError as exc:
            log.warning("PostgreSQL unavailable: %s", exc)
            raise Unavailable("the state database is unavailable; retry with backoff") from exc
        raise AssertionError("unreachable: tenacity either returns or raises")

    async def _migrate(self) -> None:
        async with self._connection(30) as conn:
            await migrate_postgres(conn, load_migrations("gmco_rl_state", "postgres"), _MIGRATION_LOCK)
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
        outcomes: dict[str, UserOutcome] = {}
        pending = sorted(groups)  # one lock order for every writer: fewer deadlocks

        async def attempt() -> dict[str, UserOutcome]:
            nonlocal pending
            rows, known = await self._read(pending, [e.event_id for u in pending for e in groups[u]])
            new = {u: [e for e in groups[u] if e.event_id not in known] for u in pending}
            for u in pending:
                if not new[u]:
                    outcomes[u] = UserOutcome(rows[u].version if u in rows else 0, 0, len(groups[u]))
            pending = [u for u in pending if new[u]]
            if not pending:
                return outcomes
            updated = await asyncio.get_running_loop().run_in_executor(
                None, lambda: [apply(rows.get(u), u, new[u]) for u in pending]
            )
            written = await self._write(updated, [e for u in pending for e in new[u]])
            for row in updated:
                if row.user_id in written:
                    events = groups[row.user_id]
                    outcomes[row.user_id] = UserOutcome(row.version, len(new[row.user_id]),
                                                        len(events) - len(new[row.user_id]))
            pending = [u for u in pending if u not in written]
            if pending:
                raise _LostRace(f"{len(pending)} users changed concurrently")
            return outcomes

        return await self._run(attempt)

    async def _write(self, rows: Sequence[StateRow], events: Sequence[Event]) -> set[str]:
        params = {
            "event_ids": [e.event_id for e in events],
            "event_users": [e.user_id for e in events],
            "media_ids": [to_int64(e.media_id) for e in events],
            "rewards": [e.reward for e in events],
            "ts": [e.timestamp_ms for e in events],
            "surfaces": [e.surface for e in events],
            "regions": [e.region for e in events],
            "devices": [e.device for e in events],
            "propensities": [e.propensity for e in events],
            "has_vectors": [e.vector is not None for e in events],
            "policies": [e.policy for e in events],
            "user_ids": [r.user_id for r in rows],
            "versions": [r.version for r in rows],
            "event_counts": [r.event_count for r in rows],
            "prefs": [r.pref for r in rows],
            "bandit_as": [r.bandit_a for r in rows],
            "bandit_bs": [r.bandit_b for r in rows],
            "seens": [r.seen for r in rows],
            "n_events": len(events),
            "n_users": len(rows),
        }
        async with self._connection() as conn:
            cur = await conn.execute(_WRITE, params)
            return {user for (user,) in await cur.fetchall()}
