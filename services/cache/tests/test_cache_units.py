"""Unit tests: the byte-bounded TTL store and the cache's resilience over stand-in backends."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence

import pytest
from cache_testkit import counter, make_settings
from gmco_cache.backend import PartialFailure
from gmco_cache.cache import Cache, Policy
from gmco_cache.keys import recommendations_key, user_vector_key
from gmco_cache.memory import BoundedTtlStore, MemoryBackend
from gmco_common.breaker import CircuitBreaker, State
from gmco_common.context import deadline_var


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_lru_ttl_expiry() -> None:
    clock = Clock()
    lru = BoundedTtlStore(10, 10_000, clock)
    lru.set("a", b"1", ttl_seconds=5)
    clock.now += 4.9
    assert lru.get("a") == b"1"
    clock.now += 0.2
    assert lru.get("a") is None
    assert len(lru) == 0 and lru.bytes == 0


def test_lru_bounded_by_entries_and_bytes() -> None:
    lru = BoundedTtlStore(3, 10_000, Clock())
    for k in "abc":
        lru.set(k, b"v", 60)
    lru.get("a")  # a is now the most recent; b is the least
    lru.set("d", b"v", 60)
    assert lru.get("b") is None and lru.get("a") == b"v" and len(lru) == 3

    small = BoundedTtlStore(100, 20, Clock())
    small.set("k1", b"x" * 8, 60)  # 10 bytes with the key
    small.set("k2", b"x" * 8, 60)
    small.set("k3", b"x" * 8, 60)  # over 20 bytes: k1 goes
    assert small.get("k1") is None and small.bytes == 20
    assert small.set("big", b"x" * 30, 60) is False  # larger than the bound: not stored
    assert small.get("k2") == b"x" * 8 and small.bytes == 20
    small.set("k2", b"y", 60)  # a replacement re-counts its bytes
    assert small.bytes == 13


async def test_memory_lock_is_single_flight() -> None:
    backend = MemoryBackend(100, 10_000)
    assert await backend.set_if_absent("lock", b"t1", 1000)
    assert not await backend.set_if_absent("lock", b"t2", 1000)
    assert not await backend.delete_if_equal("lock", b"t2")
    assert await backend.delete_if_equal("lock", b"t1")
    assert await backend.set_if_absent("lock", b"t2", 1000)
    assert await backend.delete_if_equal("lock", None)


class Broken:
    """A backend whose every call fails or hangs."""

    name = "broken"

    def __init__(self, hang: bool) -> None:
        self.hang = hang
        self.calls = 0

    async def _fail(self) -> None:
        self.calls += 1
        if self.hang:
            await asyncio.sleep(3600)
        raise ConnectionError("connection refused")

    async def get_many(self, keys: Sequence[str]) -> list[bytes | None]:
        await self._fail()
        return []

    async def set_many(self, items) -> None:
        await self._fail()

    async def set_if_absent(self, key, value, ttl_ms) -> bool:
        await self._fail()
        return False

    async def delete_if_equal(self, key, value) -> bool:
        await self._fail()
        return False

    def failed(self) -> None:
        pass


def _cache(backend, **overrides) -> Cache:
    settings = make_settings(op_timeout_seconds=0.02, breaker_failures=3, breaker_open_seconds=60, **overrides)
    return Cache(backend, Policy.from_settings(settings), CircuitBreaker(3, 60.0))


@pytest.mark.parametrize("hang", [False, True])
async def test_failing_backend_gives_bypassed_misses_then_opens(hang: bool) -> None:
    backend = Broken(hang)
    cache = _cache(backend)
    key = recommendations_key("u", "c", 1)
    before = counter("gmco_cache_requests_total", keyspace="recommendations", op="get", result="bypass")
    for _ in range(5):
        found = await cache.get_recommendations(key, lock_on_miss=True)
        assert found.value is None and found.bypassed and not found.lock_token
        stored = await cache.put([(key, b"v")])
        assert stored.count == 0 and stored.bypassed
    assert backend.calls == 3  # then the breaker is open and the backend is not called at all
    assert counter("gmco_cache_requests_total", keyspace="recommendations", op="get", result="bypass") == before + 5
    assert await cache.release_lock(key, "t") is False


async def test_callers_deadline_is_not_the_backends_fault() -> None:
    backend = Broken(hang=True)
    cache = _cache(backend)
    for _ in range(5):
        deadline_var.set(time.monotonic() - 1)  # the caller has no time left
        lookup = await cache.get([user_vector_key("u")])
        assert lookup.bypassed
    deadline_var.set(None)
    assert cache._breaker.state is State.CLOSED


class HalfBroken(MemoryBackend):
    """Serves even positions of a batch; reports the rest as failed (one cluster node down)."""

    async def get_many(self, keys: Sequence[str]) -> list[bytes | None]:
        values = await super().get_many(keys)
        raise PartialFailure([v if i % 2 == 0 else None for i, v in enumerate(values)], ConnectionError("node"))


async def test_partial_failure_serves_what_it_can() -> None:
    backend = HalfBroken(100, 10_000)
    cache = _cache(backend)
    keys = [user_vector_key(f"u{i}") for i in range(4)]
    await cache.put([(k, b"v") for k in keys])
    lookup = await cache.get(keys)
    assert lookup.bypassed and lookup.values == [b"v", None, b"v", None]
