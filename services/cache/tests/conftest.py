"""Fixtures: a cache on the memory backend (the Redis Cluster comes from the project plugin)."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
from cache_testkit import Service, make_settings, serve


@pytest.fixture
async def memory_service() -> AsyncIterator[Service]:
    async with serve(make_settings(backend="memory")) as svc:
        yield svc
