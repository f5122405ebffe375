"""Schema migrations: applied once, recorded, safe to run again, guarded by the model fingerprint."""

from __future__ import annotations

import asyncio
import dataclasses
import sqlite3

import psycopg
import pytest
from gmco_common.config import ConfigError
from gmco_common.migrations import load_migrations
from gmco_rl_state.app import open_store
from gmco_rl_state.config import Settings
from rl_state_testkit import make_settings


def _applied(settings: Settings) -> list[tuple[int, str, str]]:
    query = "SELECT version, name, CAST(applied_at AS TEXT) FROM schema_migrations ORDER BY version"
    if settings.backend == "postgres":
        with psycopg.connect(settings.postgres_dsn) as conn:  # type: ignore[arg-type]
            return [tuple(r) for r in conn.execute(query)]  # type: ignore[misc]
    with sqlite3.connect(settings.sqlite_path) as conn:
        return [tuple(r) for r in conn.execute(query)]


async def _open_and_close(settings: Settings) -> None:
    async with open_store(settings):
        pass


async def test_migrations_apply_once_and_twice_is_safe(settings: Settings) -> None:
    await _open_and_close(settings)
    first = _applied(settings)
    expected = [(m.version, m.name) for m in load_migrations("gmco_rl_state", settings.backend)]
    assert [(v, n) for v, n, _ in first] == expected
    await _open_and_close(settings)
    assert _applied(settings) == first  # nothing re-applied, nothing re-recorded


@pytest.mark.integration
async def test_concurrent_starts_migrate_once(empty_dsn: str, tmp_path) -> None:
    settings = make_settings("postgres", tmp_path, empty_dsn)
    await asyncio.gather(*(_open_and_close(settings) for _ in range(3)))
    assert len(_applied(settings)) == len(load_migrations("gmco_rl_state", "postgres"))


async def test_changed_projection_is_refused(settings: Settings) -> None:
    await _open_and_close(settings)
    with pytest.raises(ConfigError, match="BANDIT_DIM"):
        await _open_and_close(dataclasses.replace(settings, bandit_dim=settings.bandit_dim + 1))


def test_every_dialect_has_the_same_versions() -> None:
    assert [m.version for m in load_migrations("gmco_rl_state", "postgres")] == [m.version for m in load_migrations("gmco_rl_state", "sqlite")]
