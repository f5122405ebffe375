"""Component tests: the real service on the memory backend, a real grpc.aio server and channel."""

from __future__ import annotations

import asyncio

import grpc
import pytest
from cache_testkit import Service, counter, make_settings, rec_key, recomputations_under_stampede, recs, serve
from gmco.cache.v1 import cache_service_pb2 as pb


async def test_put_get_and_version_invalidation(memory_service: Service) -> None:
    stub = memory_service.stub
    miss = await stub.GetRecommendations(pb.GetRecommendationsRequest(user_id="u1", context_hash="c", user_version=1))
    assert not miss.hit and not miss.bypassed
    put = await stub.PutRecommendations(pb.PutRecommendationsRequest(
        user_id="u1", context_hash="c", user_version=1, recommendations=recs(5, 6, 7)))
    assert put.stored and not put.bypassed
    hit = await stub.GetRecommendations(pb.GetRecommendationsRequest(user_id="u1", context_hash="c", user_version=1))
    assert hit.hit and [i.media_id for i in hit.recommendations.items] == [5, 6, 7]
    # A bumped user-state version makes the old entry unreachable.
    bumped = await stub.GetRecommendations(pb.GetRecommendationsRequest(user_id="u1", context_hash="c",
                                                                        user_version=2))
    assert not bumped.hit
    other_context = await stub.GetRecommendations(pb.GetRecommendationsRequest(user_id="u1", context_hash="d",
                                                                               user_version=1))
    assert not other_context.hit


async def test_put_recommendations_batch_stores_each_list_under_its_own_key(memory_service: Service) -> None:
    stub = memory_service.stub
    puts = [pb.PutRecommendationsRequest(user_id=f"u{i}", context_hash="c", user_version=i, recommendations=recs(i))
            for i in range(4)]
    stored = await stub.PutRecommendationsBatch(pb.PutRecommendationsBatchRequest(puts=puts))
    assert stored.stored_count == 4 and not stored.bypassed
    for i in range(4):
        got = await stub.GetRecommendations(pb.GetRecommendationsRequest(user_id=f"u{i}", context_hash="c",
                                                                         user_version=i))
        assert got.hit and [it.media_id for it in got.recommendations.items] == [i]
    # One bad entry refuses the whole batch, naming it, and stores nothing.
    bad = [pb.PutRecommendationsRequest(user_id="v0", context_hash="c", recommendations=recs(1)),
           pb.PutRecommendationsRequest(user_id="v1", context_hash="", recommendations=recs(1))]
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.PutRecommendationsBatch(pb.PutRecommendationsBatchRequest(puts=bad))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "puts[1].context_hash" in err.value.details()
    assert not (await stub.GetRecommendations(pb.GetRecommendationsRequest(user_id="v0", context_hash="c"))).hit


async def test_batch_get_put_in_request_order(memory_service: Service) -> None:
    stub = memory_service.stub
    keys = [pb.CacheKey(keyspace=pb.KEYSPACE_USER_VECTOR, user_id=f"u{i}") for i in range(5)]
    keys += [pb.CacheKey(keyspace=pb.KEYSPACE_MEDIA_VECTOR, media_id=i) for i in range(5)]
    stored = await stub.BatchPut(pb.BatchPutRequest(entries=[
        pb.CacheEntry(key=k, value=f"v{i}".encode()) for i, k in enumerate(keys) if i % 2 == 0]))
    assert stored.stored_count == 5 and not stored.bypassed
    got = await stub.BatchGet(pb.BatchGetRequest(keys=keys))
    assert [e.found for e in got.entries] == [i % 2 == 0 for i in range(10)]
    assert [e.value for e in got.entries if e.found] == [f"v{i}".encode() for i in range(0, 10, 2)]
    assert [e.key for e in got.entries] == keys


async def test_ttl_expiry_and_override() -> None:
    async with serve(make_settings(backend="memory", rec_ttl_seconds=1)) as svc:
        key = {"user_id": "u", "context_hash": "c", "user_version": 1}
        await svc.stub.PutRecommendations(pb.PutRecommendationsRequest(**key, recommendations=recs(1)))
        await svc.stub.PutRecommendations(pb.PutRecommendationsRequest(
            user_id="u", context_hash="long", user_version=1, recommendations=recs(2), ttl_seconds=60))
        assert (await svc.stub.GetRecommendations(pb.GetRecommendationsRequest(**key))).hit
        await asyncio.sleep(1.1)
        assert not (await svc.stub.GetRecommendations(pb.GetRecommendationsRequest(**key))).hit
        assert (await svc.stub.GetRecommendations(pb.GetRecommendationsRequest(
            user_id="u", context_hash="long", user_version=1))).hit


@pytest.mark.parametrize(("call", "field"), [
    (lambda s: s.GetRecommendations(pb.GetRecommendationsRequest(context_hash="c")), "user_id"),
    (lambda s: s.GetRecommendations(pb.GetRecommendationsRequest(user_id="u")), "context_hash"),
    (lambda s: s.PutRecommendations(pb.PutRecommendationsRequest(user_id="u", context_hash="c",
                                                                 recommendations=recs(*range(200)))),
     "recommendations"),
    (lambda s: s.PutRecommendationsBatch(pb.PutRecommendationsBatchRequest()), "puts"),
    (lambda s: s.BatchGet(pb.BatchGetRequest()), "keys"),
    (lambda s: s.BatchPut(pb.BatchPutRequest()), "entries"),
    (lambda s: s.BatchGet(pb.BatchGetRequest(keys=[rec_key("u"), pb.CacheKey(user_id="u")])), "keys[1].keyspace"),
    (lambda s: s.BatchGet(pb.BatchGetRequest(keys=[rec_key("u", context="")])), "keys[0].context_hash"),
    (lambda s: s.BatchPut(pb.BatchPutRequest(entries=[pb.CacheEntry(key=rec_key("u"), value=b"x" * 2000)])),
     "entries[0].value"),
    (lambda s: s.ReleaseLock(pb.ReleaseLockRequest(user_id="u")), "context_hash"),
])
async def test_bad_input_is_invalid_argument(call, field: str) -> None:
    async with serve(make_settings(backend="memory", max_value_bytes=1000)) as svc:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await call(svc.stub)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert err.value.details().startswith(f"{field}:")


async def test_concurrent_misses_recompute_once() -> None:
    """20 callers miss together; the one that gets the fill lock recomputes, the others wait for its put."""
    async with serve(make_settings(backend="memory", lock_wait_seconds=10)) as svc:
        assert await recomputations_under_stampede(svc.stub, "hot") == 1


async def test_release_lock_only_with_the_holders_token(memory_service: Service) -> None:
    stub = memory_service.stub
    request = pb.GetRecommendationsRequest(user_id="u", context_hash="c", user_version=3, lock_on_miss=True)
    first = await stub.GetRecommendations(request)
    assert first.lock_acquired
    release = {"user_id": "u", "context_hash": "c", "user_version": 3}
    assert not (await stub.ReleaseLock(pb.ReleaseLockRequest(**release, lock_token="not-mine"))).released
    assert not (await stub.GetRecommendations(request)).lock_acquired  # still held: waited, then busy
    assert (await stub.ReleaseLock(pb.ReleaseLockRequest(**release, lock_token=first.lock_token))).released
    assert (await stub.GetRecommendations(request)).lock_acquired


async def test_metrics_count_hits_and_misses(memory_service: Service) -> None:
    def value(result: str) -> float:
        return counter("gmco_cache_requests_total", keyspace="media_vector", op="get", result=result)

    hits, misses = value("hit"), value("miss")
    keys = [pb.CacheKey(keyspace=pb.KEYSPACE_MEDIA_VECTOR, media_id=m) for m in (1, 2, 3)]
    await memory_service.stub.BatchPut(pb.BatchPutRequest(entries=[pb.CacheEntry(key=keys[0], value=b"v")]))
    await memory_service.stub.BatchGet(pb.BatchGetRequest(keys=keys))
    assert value("hit") == hits + 1 and value("miss") == misses + 2
