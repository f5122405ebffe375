"""The project's pytest plugin (registered once, in the root ``conftest.py``): the shared fixtures.

- ``postgres``: one throwaway PostgreSQL 15 for the session (tests that stop or kill it start their own).
- ``redis_cluster``: one 6-node Redis Cluster for the session; ``fresh_cluster`` flushes it first.
- ``milvus_server``: one Milvus 2.3.5 standalone server for the session (the ``milvus`` wheel's binary).
- ``fake_clock``: a settable monotonic clock for breakers, LRUs and TTLs.
- the ``gpu`` marker: skipped, visibly, where no usable GPU is present.

Component servers come from :func:`gmco_testing.component.component` over a service's own ``start``.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from gmco_testing.gpu import gpu_skip_reason
from gmco_testing.milvus import MilvusServer
from gmco_testing.postgres import PostgresServer
from gmco_testing.redis_cluster import RedisCluster


class FakeClock:
    """``clock()`` returns ``now``; tests move it with ``advance``."""

    def __init__(self, now: float = 100.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def fake_clock() -> FakeClock:
    return FakeClock()


@pytest.fixture(scope="session")
def postgres() -> Iterator[PostgresServer]:
    """One PostgreSQL for the session; tests that stop or kill it use their own."""
    with PostgresServer() as pg:
        yield pg


@pytest.fixture(scope="session")
def redis_cluster() -> Iterator[RedisCluster]:
    """One cluster for the session; the kill -9 tests start their own."""
    with RedisCluster() as cluster:
        yield cluster


@pytest.fixture(scope="session")
def milvus_server() -> Iterator[MilvusServer]:
    """One Milvus standalone server for the session; tests keep apart by collection name."""
    with MilvusServer() as server:
        yield server


@pytest.fixture
def fresh_cluster(redis_cluster: RedisCluster) -> RedisCluster:
    redis_cluster.flushall()
    return redis_cluster


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    gpu_items = [i for i in items if "gpu" in i.keywords]
    if not gpu_items:
        return
    reason = gpu_skip_reason()
    if reason:
        for item in gpu_items:
            item.add_marker(pytest.mark.skip(reason=f"gpu: {reason}"))
