"""Fixtures: a session-wide 6-node Redis Cluster (3 masters + 3 replicas) and a cache on the memory backend."""

from __future__ import annotations

import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from gmco_testing.redis_cluster import RedisCluster

sys.path.insert(0, str(Path(__file__).parent))  # cache_testkit, imported by the test modules

from cache_testkit import Service, make_settings, serve


@pytest.fixture(scope="session")
def redis_cluster() -> Iterator[RedisCluster]:
    """One cluster for the session; the kill -9 test starts its own."""
    with RedisCluster() as cluster:
        yield cluster


@pytest.fixture
def fresh_cluster(redis_cluster: RedisCluster) -> RedisCluster:
    redis_cluster.flushall()
    return redis_cluster


@pytest.fixture
async def memory_service() -> AsyncIterator[Service]:
    async with serve(make_settings(backend="memory")) as svc:
        yield svc
