"""Component tests: a real router server in front of fake dependency servers on port 0."""

from __future__ import annotations

import asyncio

import grpc
import numpy as np
import pytest
from gmco.common.v1 import common_pb2
from gmco.rl_state.v1 import rl_state_service_pb2
from gmco.router.v1 import router_service_pb2 as pb
from gmco.shard.v1 import shard_service_pb2
from gmco_common.slots import SlotMap
from gmco_common.vectors import encode_vector

CTX = common_pb2.RequestContext(surface=common_pb2.SURFACE_HOMEPAGE, region="US", device="smart_tv")


def req(user: str = "u1", k: int = 5, **kw) -> pb.RecommendRequest:
    return pb.RecommendRequest(user_id=user, context=kw.pop("context", CTX), k=k, **kw)


async def test_miss_then_hit(h) -> None:
    first = await h.stub.Recommend(req(), timeout=5)
    assert len(first.items) == 5 and not first.cache_hit and not first.degraded
    assert first.router_id == "router-test" and first.user_id == "u1" and first.policy == "fake"
    stages = [t.stage for t in first.timings]
    for stage in ("user_state", "cache_get", "constraints", "shard_search", "merge", "rank"):
        assert stage in stages
    assert "cache_put" not in stages  # written after the reply
    assert {i.shard_id for i in first.items} <= {0, 1}
    await _eventually(lambda: h.cache.switch.calls.get("Put", 0) == 1)
    second = await h.stub.Recommend(req(), timeout=5)
    assert second.cache_hit and [i.media_id for i in second.items] == [i.media_id for i in first.items]
    # The version was learnt on the first call and the list kept in the router: no rl_state call, and
    # no cache-service round trip either.
    assert h.rl.switch.calls["GetUserState"] == 1
    assert h.cache.switch.calls["Get"] == 1 and h.cache.switch.calls["Put"] == 1
    assert [t.stage for t in second.timings] == ["local_cache_get"]
    assert not any(i.HasField("vector") for i in second.items)


async def test_misses_reuse_the_user_state_at_the_known_version_until_feedback_bumps_it(h, make_harness) -> None:
    """skip_cache misses of one user read its state from rl_state once; feedback through the router bumps the
    version, so the next miss reads the new state (and excludes the item just seen) instead of the old copy."""
    first = await h.stub.Recommend(req(skip_cache=True), timeout=5)
    await h.stub.Recommend(req(skip_cache=True), timeout=5)
    again = await h.stub.Recommend(req(skip_cache=True), timeout=5)
    assert h.rl.switch.calls["GetUserState"] == 1 and h.rl.switch.calls["Rank"] == 3
    assert "user_state" not in [t.stage for t in again.timings] and not again.degraded
    liked = first.items[0].media_id
    event = rl_state_service_pb2.FeedbackEvent(event_id="e-state", user_id="u1", media_id=liked, reward=1.0)
    await h.stub.RecordFeedback(pb.RecordFeedbackRequest(events=[event]), timeout=5)
    after = await h.stub.Recommend(req(skip_cache=True), timeout=5)
    assert h.rl.switch.calls["GetUserState"] == 2 and after.user_version == 1
    assert liked not in {i.media_id for i in after.items}  # the new state's seen items were used
    async with make_harness(user_state_cache_entries=0) as off:
        for _ in range(3):
            await off.stub.Recommend(req(skip_cache=True), timeout=5)
        assert off.rl.switch.calls["GetUserState"] == 3


async def test_router_list_cache_serves_hits_while_the_cache_service_is_down(h) -> None:
    first = await h.stub.Recommend(req(), timeout=5)
    h.cache.switch.down = True
    again = await h.stub.Recommend(req(), timeout=5)
    assert again.cache_hit and not again.degraded
    assert [i.media_id for i in again.items] == [i.media_id for i in first.items]
    other = await h.stub.Recommend(req(user="u2"), timeout=5)  # not held locally: the lookup fails, degraded
    assert not other.cache_hit and list(other.degraded_components) == ["cache"]


async def test_router_list_cache_off_or_expired_asks_the_cache_service(make_harness) -> None:
    async with make_harness(list_cache_entries=0) as h:
        await h.stub.Recommend(req(), timeout=5)
        await _eventually(lambda: h.cache.switch.calls.get("Put", 0) == 1)  # after GMCO_ROUTER_CACHE_PUT_WINDOW_MS
        second = await h.stub.Recommend(req(), timeout=5)
        assert second.cache_hit and h.cache.switch.calls["Get"] == 2
        assert "local_cache_get" not in [t.stage for t in second.timings]
    async with make_harness(list_cache_ttl_seconds=0.2) as h:
        await h.stub.Recommend(req(), timeout=5)
        await asyncio.sleep(0.3)
        second = await h.stub.Recommend(req(), timeout=5)  # expired here: fetched from the cache service
        assert second.cache_hit and h.cache.switch.calls["Get"] == 2
        third = await h.stub.Recommend(req(), timeout=5)  # and kept again
        assert third.cache_hit and h.cache.switch.calls["Get"] == 2


async def test_merge_is_the_global_top_k(h) -> None:
    resp = await h.stub.Recommend(req(k=20, skip_cache=True), timeout=5)
    scores = [i.score for i in resp.items]
    assert scores == sorted(scores, reverse=True)
    assert {i.shard_id for i in resp.items} == {0, 1}
    ranked = h.rl.ranks[-1]
    assert len(ranked.candidate_media_ids) == len(set(ranked.candidate_media_ids))
    # candidates travel as the shards' bandit features, never as vectors
    assert ranked.candidate_features.count == len(ranked.candidate_media_ids)
    assert ranked.candidate_features.dimension == 16 and not ranked.candidate_vectors.count
    assert ranked.feature_version == "jl-8x16-s20240601"
    assert len(ranked.popularities) == len(ranked.candidate_media_ids)


async def test_blocked_genre_and_seen_items_reach_the_shards(h) -> None:
    h.rl.seen["u1"] = [7, 8, 9]
    prefs = common_pb2.UserPreferences(blocked_genres=["genre:horror"])
    resp = await h.stub.Recommend(req(k=30, preferences=prefs), timeout=5)
    assert all(h.catalogue.genres[i.media_id] != h.genre_codes["genre:horror"] for i in resp.items)
    sent = h.shards[0][0].searches[-1].filter
    assert list(sent.blocked_genre_ids) == [h.genre_codes["genre:horror"]]
    assert {7, 8, 9} <= set(sent.excluded_media_ids)
    search = h.shards[0][0].searches[-1]
    assert search.include_features and search.columnar and not search.include_vectors


async def test_feedback_fills_vectors_and_makes_the_cache_stale(h) -> None:
    before = await h.stub.Recommend(req(), timeout=5)
    liked = before.items[0].media_id
    event = rl_state_service_pb2.FeedbackEvent(event_id="e1", user_id="u1", media_id=liked, reward=1.0)
    fb = await h.stub.RecordFeedback(pb.RecordFeedbackRequest(events=[event]), timeout=5)
    assert fb.applied_count == 1 and fb.user_versions[0].version == 1
    assert h.rl.feedback[-1].media_vector.dimension == h.dim  # filled from the owning shard's GetMedia
    after = await h.stub.Recommend(req(), timeout=5)
    assert not after.cache_hit and after.user_version == 1
    assert liked not in {i.media_id for i in after.items}


async def test_shard_down_is_degraded_and_named(h) -> None:
    h.shards[1][0].switch.down = True
    resp = await h.stub.Recommend(req(skip_cache=True), timeout=5)
    assert resp.degraded and list(resp.degraded_components) == ["shard-1"]
    assert resp.items and {i.shard_id for i in resp.items} == {0}
    assert ("u1", "any") not in h.cache.store  # degraded answers are not cached
    assert len(h.cache.store) == 0


async def test_every_shard_down_is_unavailable(h) -> None:
    for row in h.shards:
        row[0].switch.down = True
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await h.stub.Recommend(req(), timeout=5)
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE


@pytest.mark.parametrize("component", ["cache", "ontology", "rl_state"])
async def test_dependency_down_still_answers(h, component: str) -> None:
    fake = {"cache": h.cache, "ontology": h.ontology, "rl_state": h.rl}[component]
    fake.switch.down = True
    resp = await h.stub.Recommend(req(), timeout=5)
    assert resp.items and resp.degraded and list(resp.degraded_components) == [component]


async def test_stale_filter_is_used_when_the_ontology_fails(h) -> None:
    prefs = common_pb2.UserPreferences(blocked_genres=["genre:comedy"])
    await h.stub.Recommend(req(preferences=prefs), timeout=5)
    h.ontology.switch.down = True
    resp = await h.stub.Recommend(req(user="u2", preferences=prefs), timeout=5)
    assert h.shards[0][0].searches[-1].filter.blocked_genre_ids == [h.genre_codes["genre:comedy"]]
    assert all(h.catalogue.genres[i.media_id] != h.genre_codes["genre:comedy"] for i in resp.items)


@pytest.mark.parametrize(("request_", "metadata", "field"), [
    (pb.RecommendRequest(context=CTX, k=5), (), "user_id"),
    (pb.RecommendRequest(user_id="a", context=CTX, k=5), (("x-user-id", "b"),), "user_id"),
    (pb.RecommendRequest(user_id="a", context=CTX, k=0), (), "k"),
    (pb.RecommendRequest(user_id="a", context=CTX, k=101), (), "k"),
    (pb.RecommendRequest(user_id="a", context=common_pb2.RequestContext(surface=99, region="US"), k=5), (),
     "context.surface"),
    (pb.RecommendRequest(user_id="a", context=common_pb2.RequestContext(surface=1, region="XX"), k=5), (),
     "context.region"),
    (pb.RecommendRequest(user_id="a", context=CTX, k=5,
                         preferences=common_pb2.UserPreferences(blocked_genres=["genre:nope"])), (),
     "preferences.blocked_genres"),
])
async def test_bad_input_is_invalid_argument(h, request_, metadata, field: str) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await h.stub.Recommend(request_, metadata=metadata, timeout=5)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field in err.value.details()


async def test_a_request_without_context_gets_the_documented_defaults(h) -> None:
    resp = await h.stub.Recommend(pb.RecommendRequest(user_id="plain", k=3), timeout=5)
    assert len(resp.items) == 3 and not resp.degraded


async def test_batched_misses_with_different_filters_each_get_their_own(make_harness) -> None:
    async with make_harness(batch_window_ms=50.0) as h:
        # A first miss holds the shards for a while; the three that arrive meanwhile share the next Search.
        h.shards[0][0].switch.delay = 0.3
        first = asyncio.ensure_future(h.stub.Recommend(req(user="w-first", k=10), timeout=5))
        await _eventually(lambda: h.shards[0][0].switch.calls.get("Search", 0) == 1)
        h.shards[0][0].switch.delay = 0.0
        h.rl.seen["w0"] = [m for m in h.catalogue.vectors if m % 2 == 0]  # w0 has seen every even item
        prefs = [common_pb2.UserPreferences(blocked_genres=["genre:horror"]), common_pb2.UserPreferences(),
                 common_pb2.UserPreferences(blocked_genres=["genre:comedy"])]
        answers = await asyncio.gather(*(h.stub.Recommend(req(user=f"w{i}", k=10, preferences=prefs[i]), timeout=5)
                                         for i in range(3)))
        await first
        shard_calls = h.shards[0][0].switch.calls["Search"]
        shared = [s for s in h.shards[0][0].searches if s.queries.count > 1]
        assert shard_calls == 2 and len(shared) == 1 and shared[0].queries.count == 3  # one shared Search
        assert len(shared[0].query_filters) == 3
        assert all(m % 2 for m in (i.media_id for i in answers[0].items))  # w0's own seen items stayed out
        assert not any(h.catalogue.genres[i.media_id] == h.genre_codes["genre:horror"] for i in answers[0].items)
        assert not any(h.catalogue.genres[i.media_id] == h.genre_codes["genre:comedy"] for i in answers[2].items)
        assert any(h.catalogue.genres[i.media_id] == h.genre_codes["genre:horror"] for i in answers[1].items)


async def _three_misses_behind_a_first(h, users: list[str]) -> list:
    """A first miss holds a shard; the three that arrive meanwhile share the next Search (sent when the
    window ends). Each answer, or the error it got."""
    h.shards[0][0].switch.delay = 0.3
    first = asyncio.ensure_future(h.stub.Recommend(req(user="w-first", k=10), timeout=5))
    await _eventually(lambda: h.shards[0][0].switch.calls.get("Search", 0) == 1)
    h.shards[0][0].switch.delay = 0.0
    answers = await asyncio.gather(*(h.stub.Recommend(req(user=u, k=10), timeout=5) for u in users),
                                   return_exceptions=True)
    await first
    assert h.shards[0][0].switch.calls["Search"] == 2  # w-first alone, then the three together
    return answers


async def test_misses_that_share_a_search_share_one_rank_batch(make_harness) -> None:
    async with make_harness(batch_window_ms=50.0) as h:
        answers = await _three_misses_behind_a_first(h, ["r0", "r1", "r2"])
        assert all(len(a.items) == 10 and not a.degraded for a in answers)
        assert h.rl.switch.calls.get("Rank") == 1 and h.rl.switch.calls.get("RankBatch") == 1
        assert sorted(r.user_id for r in h.rl.ranks) == ["r0", "r1", "r2", "w-first"]
        batch = await h.stub.RecommendBatch(pb.RecommendBatchRequest(requests=[req(user=f"b{i}") for i in range(4)]),
                                            timeout=5)
        assert all(len(r.items) == 5 for r in batch.responses) and h.rl.switch.calls["RankBatch"] == 2
    async with make_harness(batch_window_ms=50.0, rank_batch=False) as h:
        await _three_misses_behind_a_first(h, ["r0", "r1", "r2"])
        assert h.rl.switch.calls.get("Rank") == 4 and "RankBatch" not in h.rl.switch.calls


async def test_a_refused_rank_fails_only_its_own_request(make_harness) -> None:
    async with make_harness(batch_window_ms=50.0) as h:
        h.rl.refused_user = "r1"
        answers = await _three_misses_behind_a_first(h, ["r0", "r1", "r2"])
        assert isinstance(answers[1], grpc.aio.AioRpcError)
        assert answers[1].code() == grpc.StatusCode.INVALID_ARGUMENT and "user_id" in answers[1].details()
        assert [len(answers[i].items) for i in (0, 2)] == [10, 10]  # the others of its group are answered
        assert h.rl.switch.calls["RankBatch"] == 1 and h.rl.switch.calls["Rank"] == 1 + 3


async def test_an_rl_state_without_rank_batch_is_asked_one_by_one(make_harness) -> None:
    async with make_harness() as h:
        h.rl.rank_batch_unimplemented = True
        batch = pb.RecommendBatchRequest(requests=[req(user=f"b{i}") for i in range(4)])
        for _ in range(2):
            resp = await h.stub.RecommendBatch(batch, timeout=5)
            assert all(len(r.items) == 5 and not r.degraded for r in resp.responses)
        assert h.rl.switch.calls["RankBatch"] == 1  # found out once, not asked again
        assert h.rl.switch.calls["Rank"] == 4  # the second batch is answered from the router's list cache


async def test_rank_batch_failing_degrades_every_request_of_the_batch(h) -> None:
    batch = pb.RecommendBatchRequest(requests=[req(user=f"d{i}") for i in range(3)])
    await h.stub.RecommendBatch(batch, timeout=5)  # the users' state is known now
    h.rl.switch.down = True
    resp = await h.stub.RecommendBatch(pb.RecommendBatchRequest(requests=[req(user=f"d{i}", skip_cache=True)
                                                                          for i in range(3)]), timeout=5)
    assert all(r.degraded and "rl_state" in r.degraded_components and r.policy == "retrieval_order"
               and len(r.items) == 5 for r in resp.responses)


async def test_a_failed_or_dropped_cache_put_never_reaches_the_caller(make_harness) -> None:
    from prometheus_client import REGISTRY

    def puts(result: str) -> float:
        return REGISTRY.get_sample_value("gmco_router_cache_puts_total", {"result": result}) or 0.0

    async with make_harness() as h:
        failed = puts("failed")
        h.cache.puts_fail = True
        resp = await h.stub.Recommend(req(user="p1"), timeout=5)
        assert resp.items and not resp.degraded  # the reply went out before the write failed
        await _eventually(lambda: puts("failed") > failed)
    async with make_harness(cache_put_max_pending=1) as h:
        dropped = puts("dropped")
        h.cache.put_delay = 1.0  # writes pile up
        answers = await asyncio.gather(*(h.stub.Recommend(req(user=f"d{i}"), timeout=5) for i in range(4)))
        assert all(a.items and not a.degraded for a in answers)
        assert puts("dropped") > dropped


async def test_cache_puts_within_the_window_share_one_call(make_harness) -> None:
    """Six misses answered together: their six lists reach the cache service in one PutRecommendationsBatch;
    with the window off, one PutRecommendations each; an older cache service without the batch method gets
    one put per list, and every list is stored either way."""
    users = [f"w{i}" for i in range(6)]
    async with make_harness(cache_put_window_ms=200) as h:
        await asyncio.gather(*(h.stub.Recommend(req(user=u), timeout=5) for u in users))
        await _eventually(lambda: sum(h.cache.batch_sizes) == 6)
        assert h.cache.batch_sizes == [6] and h.cache.switch.calls.get("Put", 0) == 0
        assert {key[0] for key in h.cache.store} == set(users)
    async with make_harness(cache_put_window_ms=0) as h:
        await asyncio.gather(*(h.stub.Recommend(req(user=u), timeout=5) for u in users))
        await _eventually(lambda: h.cache.switch.calls.get("Put", 0) == 6)
        assert h.cache.batch_sizes == []
    async with make_harness(cache_put_window_ms=200) as h:
        h.cache.batch_unimplemented = True
        await asyncio.gather(*(h.stub.Recommend(req(user=u), timeout=5) for u in users))
        await _eventually(lambda: h.cache.switch.calls.get("Put", 0) == 6)
        assert {key[0] for key in h.cache.store} == set(users)


async def test_a_user_without_state_gets_the_most_popular_allowed_items(h) -> None:
    h.rl.query = np.zeros(h.dim, np.float32)  # the cold-start state: no preference vector
    resp = await h.stub.Recommend(req(user="newcomer", k=5, skip_cache=True), timeout=5)
    search = h.shards[0][0].searches[-1]
    assert search.order == shard_service_pb2.SEARCH_ORDER_POPULARITY
    allowed = sorted(h.catalogue.popularity, key=lambda m: -h.catalogue.popularity[m])
    assert {i.media_id for i in resp.items} <= set(allowed[:40])


async def _eventually(predicate, timeout: float = 5.0) -> None:
    for _ in range(int(timeout / 0.02)):
        if predicate():
            return
        await asyncio.sleep(0.02)
    assert predicate()


async def test_user_id_from_metadata(h) -> None:
    resp = await h.stub.Recommend(pb.RecommendRequest(context=CTX, k=3), metadata=(("x-user-id", "meta"),),
                                  timeout=5)
    assert resp.user_id == "meta" and len(resp.items) == 3


async def test_deadline_is_propagated_and_calls_do_not_outlive_it(make_harness) -> None:
    async with make_harness() as h:
        await h.stub.Recommend(req(), timeout=0.8)
        assert all(r is not None and r <= 0.8 for r in h.shards[0][0].switch.remaining)
        for row in h.shards:
            row[0].switch.delay = 5.0
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await h.stub.Recommend(req(user="slow"), timeout=0.3)
        assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        # The shards saw their calls cancelled at the caller's deadline, not after their 5 s.
        for _ in range(40):
            if all(row[0].switch.cancelled for row in h.shards):
                break
            await asyncio.sleep(0.05)
        assert all(row[0].switch.cancelled >= 1 for row in h.shards)


async def test_concurrent_identical_misses_compute_once(h) -> None:
    for row in h.shards:
        row[0].switch.delay = 0.2
    answers = await asyncio.gather(*(h.stub.Recommend(req(user="same"), timeout=5) for _ in range(6)))
    assert len({tuple(i.media_id for i in a.items) for a in answers}) == 1
    assert h.shards[0][0].switch.calls["Search"] == 1
    assert len(h.rl.ranks) == 1


async def test_batch_is_one_search_per_shard(h) -> None:
    batch = pb.RecommendBatchRequest(requests=[req(user=f"b{i}") for i in range(4)])
    resp = await h.stub.RecommendBatch(batch, timeout=5)
    assert [r.user_id for r in resp.responses] == ["b0", "b1", "b2", "b3"]
    assert all(len(r.items) == 5 for r in resp.responses)
    assert h.shards[0][0].switch.calls["Search"] == 1
    assert h.shards[0][0].searches[0].queries.count == 4
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await h.stub.RecommendBatch(pb.RecommendBatchRequest(requests=[req(), req(k=0)]), timeout=5)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "requests[1].k" in err.value.details()


async def test_writes_go_to_every_replica_of_the_owning_shard(make_harness) -> None:
    async with make_harness(replicas=(2, 2)) as h:
        ids = [1001, 1002, 1003, 1004, 1005, 1006]
        items = [common_pb2.MediaItem(media_id=m, vector=encode_vector(h.catalogue.vectors[1])) for m in ids]
        resp = await h.stub.UpsertMedia(pb.UpsertMediaRequest(items=items), timeout=5)
        assert resp.upserted_count == len(ids) and resp.lsn == 0
        slots = SlotMap.even(2)
        for sid, row in enumerate(h.shards):
            expected = sorted(m for m in ids if slots.shard_of(m) == sid)
            assert all(sorted(replica.upserted) == expected for replica in row)
        deleted = await h.stub.DeleteMedia(pb.DeleteMediaRequest(media_ids=ids[:2]), timeout=5)
        assert deleted.deleted_count == 2
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await h.stub.UpsertMedia(pb.UpsertMediaRequest(items=items[:1] * 2), timeout=5)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "media_id" in err.value.details()
        h.shards[0][1].switch.down = True
        h.shards[1][1].switch.down = True
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await h.stub.UpsertMedia(pb.UpsertMediaRequest(items=items), timeout=5)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE


async def test_a_failed_replica_is_passed_over(make_harness) -> None:
    async with make_harness(replicas=(2, 1)) as h:
        h.shards[0][0].switch.down = True
        for i in range(10):
            resp = await h.stub.Recommend(req(user=f"r{i}"), timeout=5)
            assert not resp.degraded
        # Failed calls fail over; after BREAKER_FAILURES of them the circuit keeps replica 0 out
        # (each failed call is seen twice by the server: the channel retries UNAVAILABLE once).
        assert h.shards[0][0].switch.calls.get("Search", 0) <= 2 * h.settings.breaker_failures
        assert h.shards[0][1].switch.calls["Search"] == 10
        await h.shard_servers[0][0].set_serving(False)
        h.shards[0][0].switch.down = False
        await asyncio.sleep(0.5)  # a health round marks it unhealthy
        before = h.shards[0][0].switch.calls.get("Search", 0)
        await h.stub.Recommend(req(user="after"), timeout=5)
        assert h.shards[0][0].switch.calls.get("Search", 0) == before
