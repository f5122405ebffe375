"""``gmco migrate``: apply (or list) the schema migrations of the catalogue log and of rl_state.

The same migrations, and the same code, that the services apply when they start
(``gmco_common.migrations``); running them ahead of a rollout keeps a schema change out of the start-up
of every replica. Applying twice is a no-op; PostgreSQL takes the services' own advisory lock.
"""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path

import click

PACKAGES = {"catalog": "gmco_catalog", "rl_state": "gmco_rl_state"}


def _lock_key(store: str) -> int:
    if store == "catalog":
        from gmco_catalog.postgres_log import _SCHEMA_LOCK

        return _SCHEMA_LOCK
    from gmco_rl_state.postgres_store import _MIGRATION_LOCK

    return _MIGRATION_LOCK


def _sqlite_applied(path: str) -> set[int]:
    if not Path(path).exists():
        return set()
    with sqlite3.connect(path) as db:
        try:
            return {v for (v,) in db.execute("SELECT version FROM schema_migrations")}
        except sqlite3.OperationalError:
            return set()


async def _postgres(dsn: str, store: str, apply: bool) -> tuple[set[int], list[int]]:
    import psycopg
    from gmco_common.migrations import load_migrations, migrate_postgres

    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        cur = await conn.execute("SELECT to_regclass('schema_migrations') IS NOT NULL")
        exists = (await cur.fetchone())[0]
        applied: set[int] = set()
        if exists:
            cur = await conn.execute("SELECT version FROM schema_migrations")
            applied = {v for (v,) in await cur.fetchall()}
        done: list[int] = []
        if apply:
            done = [m.version for m in await migrate_postgres(conn, load_migrations(PACKAGES[store], "postgres"),
                                                              _lock_key(store))]
        return applied, done


@click.command("migrate")
@click.argument("store", type=click.Choice(sorted(PACKAGES)))
@click.option("--dsn", required=True, metavar="DSN",
              help="postgresql://... or a SQLite path (the catalogue log's GMCO_ROUTER_CATALOG_DSN, or rl_state's "
                   "GMCO_RL_STATE_POSTGRES_DSN / GMCO_RL_STATE_SQLITE_PATH)")
@click.option("--status", "status_only", is_flag=True, help="list applied and pending migrations; change nothing")
def migrate(store: str, dsn: str, status_only: bool) -> None:
    """Apply the pending schema migrations of STORE (catalog or rl_state) at DSN."""
    from gmco_common.migrations import load_migrations, migrate_sqlite

    postgres = dsn.startswith(("postgresql://", "postgres://"))
    dialect = "postgres" if postgres else "sqlite"
    migrations = load_migrations(PACKAGES[store], dialect)
    path = dsn.removeprefix("sqlite://")
    if postgres:
        applied, done = asyncio.run(_postgres(dsn, store, apply=not status_only))
    else:
        applied, done = _sqlite_applied(path), []
        if not status_only:
            with sqlite3.connect(path, isolation_level=None) as db:
                if store == "catalog" and not applied:
                    db.execute("PRAGMA page_size=16384")  # as gmco_catalog.sqlite_log creates it (new file only)
                db.execute("PRAGMA journal_mode=WAL")
                done = [m.version for m in migrate_sqlite(db, migrations)]
            db.close()
    for m in migrations:
        state = "applied" if m.version in applied else "applied now" if m.version in done else "pending"
        click.echo(f"{m.version:04d}_{m.name}  {state}")
    pending = [m for m in migrations if m.version not in applied and m.version not in done]
    click.echo(f"{store} at {dsn}: {len(migrations) - len(pending)} of {len(migrations)} applied"
               + (f", {len(done)} now" if done else "") + (f"; {len(pending)} pending" if pending else ""))
