"""SQLite store, the embedded default: blocking ``sqlite3`` on the shared one-thread worker, WAL mode.

One thread owns the connection (``gmco_common.sqlite.SqliteWorker``), so writes are serialised by
construction; a batch is one ``BEGIN IMMEDIATE`` transaction that logs the new events (``ON CONFLICT
(event_id) DO NOTHING``) and writes every touched user's new state together. ``synchronous=FULL``: an
acknowledged event survives a power cut.

Reads of recent users come from memory (``cache_entries`` rows, least recently used out, and as many users
known to have no row yet): the file belongs to this one process, and every state it writes replaces the
copy once committed, so a copy is never older than the database. A copy only ever moves to a higher
version: a read that overlapped a write cannot put the older row back. (The hop to the database thread
and back was about a tenth of rl_state's CPU per Rank.)
"""

from __future__ import annotations

import sqlite3
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Self

from gmco_common.ids import to_int64
from gmco_common.lru import TtlLru
from gmco_common.migrations import load_migrations, migrate_sqlite
from gmco_common.sqlite import SqliteWorker, transaction

from gmco_rl_state.model import Event, StateRow
from gmco_rl_state.store import FINGERPRINT_KEY, ApplyFn, UserOutcome, check_fingerprint

_READ_STATE = """
SELECT user_id, version, event_count, pref, bandit_a, bandit_b, seen FROM user_state WHERE user_id = ?
"""
_INSERT_EVENT = """
INSERT INTO feedback_event
    (event_id, user_id, media_id, reward, event_ts_ms, surface, region, device, propensity, has_vector, policy)
VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
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
    def __init__(self, path: Path | str, fingerprint: str, cache_entries: int = 0) -> None:
        self._fingerprint = fingerprint
        self._worker = SqliteWorker(path, "rl_state", setup=self._migrate)
        self._rows: TtlLru[str, StateRow] | None = TtlLru(cache_entries, None) if cache_entries else None
        # Users read without a row (first-time users, asked for by GetUserState and Rank alike), and the
        # count of committed writes, so that a read that overlapped one never marks its user absent.
        self._absent: TtlLru[str, bool] | None = TtlLru(cache_entries, None) if cache_entries else None
        self._writes = 0

    def _remember(self, row: StateRow) -> None:
        assert self._rows is not None and self._absent is not None
        self._absent.pop(row.user_id)
        known = self._rows.get_stale(row.user_id)
        if known is None or row.version >= known.version:
            self._rows.put(row.user_id, row)

    async def __aenter__(self) -> Self:
        await self._worker.__aenter__()
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self._worker.__aexit__(exc_type, exc, tb)

    # --- on the worker's thread ---------------------------------------------------------------------
    def _migrate(self, db: sqlite3.Connection) -> None:
        migrate_sqlite(db, load_migrations("gmco_rl_state", "sqlite"))
        db.execute("INSERT INTO model_meta (key, value) VALUES (?, ?) ON CONFLICT DO NOTHING",
                   (FINGERPRINT_KEY, self._fingerprint))
        (stored,) = db.execute("SELECT value FROM model_meta WHERE key = ?", (FINGERPRINT_KEY,)).fetchone()
        check_fingerprint(stored, self._fingerprint)

    @staticmethod
    def _get(db: sqlite3.Connection, user_id: str) -> StateRow | None:
        row = db.execute(_READ_STATE, (user_id,)).fetchone()
        return None if row is None else StateRow(*row)

    def _record(self, db: sqlite3.Connection, groups: Mapping[str, Sequence[Event]],
                apply: ApplyFn) -> tuple[dict[str, UserOutcome], list[StateRow]]:
        written: list[StateRow] = []
        outcomes = transaction(db, lambda db: {user: self._record_user(db, user, events, apply, written)
                                               for user, events in groups.items()})
        return outcomes, written

    def _record_user(self, db: sqlite3.Connection, user: str, events: Sequence[Event],
                     apply: ApplyFn, written: list[StateRow]) -> UserOutcome:
        ids = [e.event_id for e in events]
        marks = ",".join("?" * len(ids))
        known = {r[0] for r in db.execute(f"SELECT event_id FROM feedback_event WHERE event_id IN ({marks})", ids)}
        row = self._get(db, user)
        new = [e for e in events if e.event_id not in known]
        if not new:
            return UserOutcome(0 if row is None else row.version, 0, len(events))
        updated = apply(row, user, new)
        db.executemany(_INSERT_EVENT, [
            (e.event_id, user, to_int64(e.media_id), e.reward, e.timestamp_ms, e.surface, e.region, e.device,
             e.propensity, e.vector is not None, e.policy) for e in new
        ])
        db.execute(_UPSERT_STATE, (user, updated.version, updated.event_count, updated.pref, updated.bandit_a,
                                   updated.bandit_b, updated.seen))
        written.append(updated)
        return UserOutcome(updated.version, len(new), len(events) - len(new))

    # --- the store interface ------------------------------------------------------------------------
    async def get(self, user_id: str, timeout: float | None) -> StateRow | None:
        if self._rows is None or self._absent is None:
            return await self._worker.call(self._get, user_id)
        row = self._rows.get(user_id)
        if row is not None or self._absent.get(user_id):
            return row
        writes = self._writes
        row = await self._worker.call(self._get, user_id)
        if row is not None:
            self._remember(row)
        elif writes == self._writes and self._rows.get_stale(user_id) is None:
            self._absent.put(user_id, True)  # no write committed while this read ran: the user has no row
        return row

    async def record(self, groups: Mapping[str, Sequence[Event]], apply: ApplyFn) -> dict[str, UserOutcome]:
        outcomes, written = await self._worker.call(self._record, groups, apply)
        self._writes += 1
        if self._rows is not None:  # committed: the copies move on to the new versions
            for row in written:
                self._remember(row)
        return outcomes
