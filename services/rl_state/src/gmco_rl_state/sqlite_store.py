"""SQLite store, the embedded default: blocking ``sqlite3`` on one dedicated thread, WAL mode.

One thread owns the connection, so writes are serialised by construction; a batch is one
``BEGIN IMMEDIATE`` transaction that logs the new events (``ON CONFLICT (event_id) DO NOTHING``) and
writes every touched user's new state together. ``synchronous=FULL``: an acknowledged event survives
a power cut.
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import TracebackType
from typing import Self, TypeVar

from gmco_common.errors import Unavailable

from gmco_rl_state.migrate import MIGRATIONS_TABLE, load_migrations, pending
from gmco_rl_state.model import Event, StateRow
from gmco_rl_state.store import FINGERPRINT_KEY, ApplyFn, UserOutcome, check_fingerprint, to_int64

log = logging.getLogger(__name__)

T = TypeVar("T")

_READ_STATE = """
SELECT user_id, version, event_count, pref, bandit_a, bandit_b, seen FROM user_state WHERE user_id = ?
"""
_INSERT_EVENT = """
INSERT INTO feedback_event
    (event_id, user_id, media_id, reward, event_ts_ms, surface, region, device, propensity, has_vector)
VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
ON CONFLICT (event_id) DO NOTHING
"""
_UPSERT_STATE = """
INSERT INTO user_state (user_id, version, event_count, pref, bandit_a, bandit_b, seen) VALUES (?, ?, ?, ?, ?, ?, ?)
ON CONFLICT (user_id) DO UPDATE SET
    version = excluded.version, event_count = excluded.event_count, pref = excluded.pref,
    bandit_a = excluded.bandit_a, bandit_b = excluded.bandit_b, seen = excluded.seen,
    updated_at = strftime('%Y-%m-%dT%H:%M:%fZ', 'now')
"""


class SqliteStore:
    def __init__(self, path: Path | str, fingerprint: str) -> None:
        self._path = str(path)
        self._fingerprint = fingerprint
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="rl-state-sqlite")
        self._conn: sqlite3.Connection | None = None

    async def __aenter__(self) -> Self:
        try:
            await self._call(self._open)
        except BaseException:
            self._executor.shutdown(wait=True)
            raise
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self._call(self._close)
        self._executor.shutdown(wait=True)

    async def _call(self, fn: Callable[..., T], *args: object) -> T:
        try:
            return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)
        except sqlite3.OperationalError as exc:  # locked, disk full, I/O error: nothing was acknowledged
            log.warning("SQLite unavailable: %s", exc)
            raise Unavailable("the state database is unavailable; retry with backoff") from exc

    # --- on the store's thread ----------------------------------------------------------------------
    @property
    def _db(self) -> sqlite3.Connection:
        assert self._conn is not None, "SqliteStore used outside its context"
        return self._conn

    def _open(self) -> None:
        if self._path != ":memory:":
            Path(self._path).parent.mkdir(parents=True, exist_ok=True)
        self._conn = sqlite3.connect(self._path, isolation_level=None, check_same_thread=False, timeout=5.0)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._migrate()

    def _close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def _migrate(self) -> None:
        db = self._db
        db.execute(f"CREATE TABLE IF NOT EXISTS {MIGRATIONS_TABLE} (version INTEGER PRIMARY KEY, "
                   "name TEXT NOT NULL, applied_at TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ','now')))")
        applied = {v for (v,) in db.execute(f"SELECT version FROM {MIGRATIONS_TABLE}")}
        for migration in pending(load_migrations("sqlite"), applied):
            log.info("applying migration %04d_%s", migration.version, migration.name)
            # executescript would commit a transaction opened by execute(); keep it all in one script.
            record = (f"INSERT INTO {MIGRATIONS_TABLE} (version, name) "
                      f"VALUES ({migration.version}, '{migration.name}');")
            try:
                db.executescript(f"BEGIN IMMEDIATE;\n{migration.sql}\n{record}\nCOMMIT;")
            except sqlite3.Error:
                if db.in_transaction:
                    db.execute("ROLLBACK")
                raise
        db.execute("INSERT INTO model_meta (key, value) VALUES (?, ?) ON CONFLICT DO NOTHING",
                   (FINGERPRINT_KEY, self._fingerprint))
        (stored,) = db.execute("SELECT value FROM model_meta WHERE key = ?", (FINGERPRINT_KEY,)).fetchone()
        check_fingerprint(stored, self._fingerprint)

    def _get(self, user_id: str) -> StateRow | None:
        row = self._db.execute(_READ_STATE, (user_id,)).fetchone()
        return None if row is None else StateRow(*row)

    def _record(self, groups: Mapping[str, Sequence[Event]], apply: ApplyFn) -> dict[str, UserOutcome]:
        db = self._db
        db.execute("BEGIN IMMEDIATE")
        try:
            outcomes = {user: self._record_user(user, events, apply) for user, events in groups.items()}
            db.execute("COMMIT")
        except BaseException:
            if db.in_transaction:
                db.execute("ROLLBACK")
            raise
        return outcomes

    def _record_user(self, user: str, events: Sequence[Event], apply: ApplyFn) -> UserOutcome:
        db = self._db
        ids = [e.event_id for e in events]
        marks = ",".join("?" * len(ids))
        known = {r[0] for r in db.execute(f"SELECT event_id FROM feedback_event WHERE event_id IN ({marks})", ids)}
        row = self._get(user)
        new = [e for e in events if e.event_id not in known]
        if not new:
            return UserOutcome(0 if row is None else row.version, 0, len(events))
        updated = apply(row, user, new)
        db.executemany(_INSERT_EVENT, [
            (e.event_id, user, to_int64(e.media_id), e.reward, e.timestamp_ms, e.surface, e.region, e.device,
             e.propensity, e.vector is not None) for e in new
        ])
        db.execute(_UPSERT_STATE, (user, updated.version, updated.event_count, updated.pref, updated.bandit_a,
                                   updated.bandit_b, updated.seen))
        return UserOutcome(updated.version, len(new), len(events) - len(new))

    # --- the store interface ------------------------------------------------------------------------
    async def get(self, user_id: str, timeout: float | None) -> StateRow | None:
        return await self._call(self._get, user_id)

    async def record(self, groups: Mapping[str, Sequence[Event]], apply: ApplyFn) -> dict[str, UserOutcome]:
        return await self._call(self._record, groups, apply)
