"""Versioned schema migrations shared by the durable stores (the catalogue log, rl_state).

A package keeps ``<package>/migrations/<dialect>/NNNN_name.sql``; :func:`load_migrations` reads them in
order. A store records what it applied in ``schema_migrations`` and applies only what is missing, in one
transaction (PostgreSQL also takes an advisory lock, so that replicas starting together do not race).
Applying twice is a no-op. ``gmco migrate`` runs the same code from the command line.
"""

from __future__ import annotations

import logging
import re
import sqlite3
from dataclasses import dataclass
from importlib import resources
from typing import Any

log = logging.getLogger(__name__)

_NAME = re.compile(r"^(\d{4})_([a-z0-9_]+)\.sql$")
TABLE = "schema_migrations"
DIALECTS = ("postgres", "sqlite")


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    sql: str


def load_migrations(package: str, dialect: str) -> list[Migration]:
    """The migrations of ``dialect`` ('postgres' or 'sqlite') under ``package``.migrations, by version."""
    if dialect not in DIALECTS:
        raise ValueError(f"dialect must be one of {DIALECTS}, got {dialect!r}")
    found = []
    for entry in resources.files(f"{package}.migrations").joinpath(dialect).iterdir():
        match = _NAME.match(entry.name)
        if match:
            found.append(Migration(int(match.group(1)), match.group(2), entry.read_text(encoding="utf-8")))
    found.sort(key=lambda m: m.version)
    versions = [m.version for m in found]
    if not found or versions != list(range(1, len(found) + 1)):
        raise RuntimeError(f"{package} migrations for {dialect} must be numbered 0001.. without gaps; found {versions}")
    return found


def pending(migrations: list[Migration], applied: set[int]) -> list[Migration]:
    return [m for m in migrations if m.version not in applied]


def _statements(sql: str) -> list[str]:
    """The statements of a script, split where SQLite itself sees a complete statement."""
    out, buf = [], ""
    for line in sql.splitlines(keepends=True):
        buf += line
        if sqlite3.complete_statement(buf):
            out.append(buf.strip())
            buf = ""
    if buf.strip() and not all(part.strip().startswith("--") or not part.strip() for part in buf.splitlines()):
        raise ValueError(f"incomplete SQL statement at the end of a migration: {buf.strip()[:80]!r}")
    return out


def migrate_sqlite(db: sqlite3.Connection, migrations: list[Migration]) -> list[Migration]:
    """Apply what is missing, each migration with its record in one ``BEGIN IMMEDIATE`` transaction; what
    is applied is read inside that transaction, so processes opening one file together apply it once."""
    db.execute(f"CREATE TABLE IF NOT EXISTS {TABLE} (version INTEGER PRIMARY KEY, name TEXT NOT NULL, "
               "applied_at TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ','now')))")
    done = []
    for migration in migrations:
        db.execute("BEGIN IMMEDIATE")
        try:
            applied = {v for (v,) in db.execute(f"SELECT version FROM {TABLE}")}
            if migration.version not in applied:
                log.info("applying migration %04d_%s", migration.version, migration.name)
                for statement in _statements(migration.sql):
                    db.execute(statement)
                db.execute(f"INSERT INTO {TABLE} (version, name) VALUES (?, ?)", (migration.version, migration.name))
                done.append(migration)
            db.execute("COMMIT")
        except BaseException:
            if db.in_transaction:
                db.execute("ROLLBACK")
            raise
    return done


async def migrate_postgres(conn: Any, migrations: list[Migration], lock_key: int) -> list[Migration]:
    """Apply what is missing on a psycopg ``AsyncConnection`` in autocommit mode, under an advisory lock."""
    async with conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock(%s)", (lock_key,))
        await conn.execute(f"CREATE TABLE IF NOT EXISTS {TABLE} (version integer PRIMARY KEY, "
                           "name text NOT NULL, applied_at timestamptz NOT NULL DEFAULT now())")
        cur = await conn.execute(f"SELECT version FROM {TABLE}")
        applied = {v for (v,) in await cur.fetchall()}
        todo = pending(migrations, applied)
        for migration in todo:
            log.info("applying migration %04d_%s", migration.version, migration.name)
            await conn.execute(migration.sql)  # no parameters: several statements are allowed
            await conn.execute(f"INSERT INTO {TABLE} (version, name) VALUES (%s, %s)",
                               (migration.version, migration.name))
    return todo
