"""Fixtures: settings per backend (PostgreSQL from the project plugin's session server) and the service
started through its own ``start`` on port 0."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import psycopg
import pytest
from gmco_rl_state.config import Settings
from gmco_testing.postgres import PostgresServer
from rl_state_testkit import Service, fresh_database, make_settings, serve


@pytest.fixture(scope="session")
def contract_dsn(postgres: PostgresServer) -> str:
    return fresh_database(postgres)


@pytest.fixture
def empty_dsn(contract_dsn: str) -> str:
    """The contract database, emptied (public schema dropped and recreated): the service migrates it."""
    with psycopg.connect(contract_dsn, autocommit=True) as conn:
        conn.execute("DROP SCHEMA public CASCADE")
        conn.execute("CREATE SCHEMA public")
    return contract_dsn


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.integration)])
def settings(request: pytest.FixtureRequest, tmp_path: Path) -> Settings:
    """Settings for each backend; the shared contract suite runs once per backend."""
    if request.param == "postgres":
        return make_settings("postgres", tmp_path, request.getfixturevalue("empty_dsn"))
    return make_settings("sqlite", tmp_path)


@pytest.fixture
async def service(settings: Settings) -> AsyncIterator[Service]:
    async with serve(settings) as svc:
        yield svc
