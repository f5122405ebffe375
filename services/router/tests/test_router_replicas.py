"""Unit tests: replica selection, hedging, failover, shard spec, local caches, merge."""

from __future__ import annotations

import asyncio

import grpc
import numpy as np
import pytest
from gmco.common.v1 import common_pb2
from gmco.shard.v1 import shard_service_pb2
from gmco_common.cache_key import context_key
from gmco_common.config import ConfigError
from gmco_common.vectors import encode_batch
from gmco_router.local import SingleFlight
from gmco_router.recommend import merge
from gmco_router.replicas import (
    EXPLORE_EVERY,
    LatencyWindow,
    Replica,
    ReplicaPolicy,
    ReplicaSet,
    parse_shard_spec,
)


def test_latency_window_p95() -> None:
    w = LatencyWindow(100)
    for i in range(100):
        w.add(i / 1000)
    assert w.p95() == pytest.approx(0.095)


def _replicas(n: int, policy: ReplicaPolicy | None = None) -> list[Replica]:
    return [Replica(0, f"r{i}", grpc.aio.insecure_channel(f"127.0.0.1:{1 + i}"), policy or ReplicaPolicy())
            for i in range(n)]


async def test_pick_prefers_healthy_then_fewest_in_flight() -> None:
    r0, r1, r2 = _replicas(3)
    rset = ReplicaSet(0, [r0, r1, r2])
    r0.in_flight, r1.in_flight, r2.in_flight = 3, 1, 2
    assert rset.pick() is r1
    r1.healthy = False
    assert rset.pick() is r2
    for _ in range(5):
        r2.breaker.failure()
    assert rset.pick() is r0
    assert rset.pick(exclude=[r0]) is None


async def _by_replica(rset: ReplicaSet, behaviour: dict[str, object], log: list[str]):
    """A call whose behaviour depends on which replica's stub it is given."""
    names = {id(r.stub): r.target for r in rset.replicas}

    async def call(stub) -> str:
        name = names[id(stub)]
        log.append(name)
        action = behaviour[name]
        if isinstance(action, float):
            await asyncio.sleep(action)
            return name
        raise action  # type: ignore[misc]

    return call


def _unavailable() -> grpc.aio.AioRpcError:
    return grpc.aio.AioRpcError(grpc.StatusCode.UNAVAILABLE, grpc.aio.Metadata(), grpc.aio.Metadata(), "down")


async def test_a_slow_call_is_hedged_to_the_other_replica() -> None:
    policy = ReplicaPolicy(hedge_min_samples=5, hedge_min_delay=0.001)
    r0, r1 = _replicas(2, policy)
    for r in (r0, r1):
        for _ in range(10):
            r.latencies.add(0.01)
    rset = ReplicaSet(0, [r0, r1])
    log: list[str] = []
    call = await _by_replica(rset, {"r0": 2.0, "r1": 0.0}, log)
    r1.in_flight = 1  # make r0 the first choice; r1 is still the only backup
    result = await asyncio.wait_for(rset.call(call), timeout=1.0)
    r1.in_flight -= 1
    assert result == "r1" and log == ["r0", "r1"]
    await asyncio.sleep(0)
    assert r0.in_flight == 0  # the loser was cancelled


async def test_a_replica_that_turned_slow_loses_its_calls_but_is_still_explored() -> None:
    policy = ReplicaPolicy(hedge_min_samples=5)
    fast, slow = _replicas(2, policy)
    for _ in range(10):
        fast.latencies.add(0.005)
        slow.latencies.add(0.200)
    rset = ReplicaSet(0, [fast, slow])
    picks = [rset.pick() for _ in range(EXPLORE_EVERY * 5)]
    assert 1 <= picks.count(slow) <= 5  # only in its turns among the 5 explorations
    assert picks.count(fast) >= EXPLORE_EVERY * 5 - 5
    fast.in_flight = 100  # a replica busy enough is worse than a slow idle one
    assert rset.pick() is slow


async def test_hedge_delay_is_the_fastest_replicas_p95() -> None:
    policy = ReplicaPolicy(hedge_min_samples=5, hedge_min_delay=0.001)
    fast, slow = _replicas(2, policy)
    for _ in range(10):
        fast.latencies.add(0.005)
        slow.latencies.add(0.200)
    rset = ReplicaSet(0, [fast, slow])
    assert rset.hedge_delay(slow) == pytest.approx(0.005)
    fast.healthy = False
    assert rset.hedge_delay(slow) == pytest.approx(0.200)


async def test_a_hedges_loser_counts_as_slow() -> None:
    policy = ReplicaPolicy(hedge_min_samples=5, hedge_min_delay=0.001)
    r0, r1 = _replicas(2, policy)
    for r in (r0, r1):
        for _ in range(10):
            r.latencies.add(0.01)
    rset = ReplicaSet(0, [r0, r1])
    call = await _by_replica(rset, {"r0": 0.3, "r1": 0.0}, [])
    r1.in_flight = 1  # r0 first
    await rset.call(call)
    r1.in_flight -= 1
    await asyncio.sleep(0)
    assert len(r0.latencies) == 11  # the cancelled call left its time


async def test_no_hedge_without_latency_history() -> None:
    r0, r1 = _replicas(2)
    rset = ReplicaSet(0, [r0, r1])
    log: list[str] = []
    call = await _by_replica(rset, {"r0": 0.05, "r1": 0.05}, log)
    await rset.call(call)
    assert len(log) == 1


async def test_a_failed_call_fails_over_once() -> None:
    r0, r1 = _replicas(2)
    rset = ReplicaSet(0, [r0, r1])
    log: list[str] = []
    call = await _by_replica(rset, {"r0": _unavailable(), "r1": _unavailable()}, log)
    with pytest.raises(grpc.aio.AioRpcError):
        await rset.call(call)
    assert sorted(log) == ["r0", "r1"]
    log.clear()
    call = await _by_replica(rset, {"r0": _unavailable(), "r1": 0.0}, log)
    r1.in_flight = 1
    r0.breaker.success()
    picked_first = rset.pick()
    r1.in_flight = 0
    assert picked_first is r0
    assert await rset.call(call) in ("r0", "r1")


def test_shard_spec() -> None:
    assert parse_shard_spec("0=a:1|b:2, 1=c:3") == {0: ["a:1", "b:2"], 1: ["c:3"]}
    for bad in ("", "1=a:1", "0=a:1,0=b:2", "0=", "x=a:1", "0=nohostport"):
        with pytest.raises(ConfigError, match="GMCO_ROUTER_SHARDS"):
            parse_shard_spec(bad)


async def test_single_flight() -> None:
    flights: SingleFlight[str, int] = SingleFlight()
    assert flights.join("k") is None
    flights.lead("k")
    follower = flights.join("k")
    assert follower is not None
    flights.land("k", result=7)
    assert await follower == 7 and flights.join("k") is None
    flights.lead("k")
    failed = flights.join("k")
    flights.land("k", error=RuntimeError("x"))
    with pytest.raises(RuntimeError):
        await failed  # type: ignore[misc]


def test_context_key_ignores_preference_order() -> None:
    ctx = common_pb2.RequestContext(surface=1, region="US")
    a = context_key(ctx, common_pb2.UserPreferences(blocked_genres=["x", "y"]))
    b = context_key(ctx, common_pb2.UserPreferences(blocked_genres=["y", "x", "x"]))
    c = context_key(common_pb2.RequestContext(surface=2, region="US"), common_pb2.UserPreferences())
    assert a == b != c


def test_merge_dedupes_and_sorts() -> None:
    def answer(*items: tuple[int, float]) -> shard_service_pb2.SearchResponse:
        ids = np.asarray([m for m, _ in items], "<u8")
        feats = np.arange(len(items) * 2, dtype="<f4").reshape(len(items), 2) + ids[:, None]
        result = shard_service_pb2.QueryResult(
            media_ids=ids.tobytes(), scores=np.asarray([s for _, s in items], "<f4").tobytes(),
            popularities=np.full(len(items), 0.5, "<f4").tobytes(), features=encode_batch(feats, "float32"))
        return shard_service_pb2.SearchResponse(results=[result], feature_version="v1")

    answers = {(0,): answer((1, 0.9), (2, 0.5)), (1,): answer((3, 0.7), (1, 0.9)), (2,): None}
    merged = merge(answers, 0, 10)
    assert merged.media_ids.tolist() == [1, 3, 2]
    assert merged.shard_ids.tolist() == [0, 1, 0]
    assert merged.features[:, 0].tolist() == [1.0, 3.0, 4.0]  # each candidate keeps its own features
    assert merged.feature_version == "v1"
    assert len(merge(answers, 0, 2)) == 2
