"""Component tests: a real grpc.aio ShardService on port 0, driven through a real channel."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import threading

import grpc
import numpy as np
import pytest
from gmco.common.v1 import common_pb2
from gmco.shard.v1 import shard_service_pb2 as pb
from gmco.shard.v1 import shard_service_pb2_grpc
from gmco_common.datagen import generate_queries, save_catalogue
from gmco_common.vectors import encode_batch, encode_vector
from gmco_shard.config import Settings
from gmco_testing.procs import free_port, wait_grpc_serving
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from shard_testkit import DIM, SERVICE, serve_shard, shard_settings


def _settings(data_dir, backend: str = "hnsw", **kw) -> Settings:
    return shard_settings(data_dir, max_k=50, max_batch=64, max_message_bytes=256 * 1024, index_backend=backend,
                          **kw)


@pytest.fixture
async def shard(catalogue_dir):
    async with serve_shard(_settings(catalogue_dir)) as svc:
        yield svc.stub(shard_service_pb2_grpc.ShardServiceStub), svc.channel


async def _code(coro) -> grpc.StatusCode:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await coro
    return err.value.code(), err.value.details()


def _item(mid: int, vec: np.ndarray, **attrs) -> common_pb2.MediaItem:
    return common_pb2.MediaItem(media_id=mid, vector=encode_vector(vec), attributes=common_pb2.MediaAttributes(**attrs))


async def test_search_upsert_delete_get_stats(shard, small_catalogue) -> None:
    stub, _ = shard
    q = generate_queries(small_catalogue, 4)
    resp = await stub.Search(pb.SearchRequest(queries=encode_batch(q), k=5, include_vectors=True,
                                              include_attributes=True))
    assert len(resp.results) == 4 and all(len(r.items) == 5 for r in resp.results)
    top = resp.results[0].items[0]
    assert top.vector.dimension == DIM and top.attributes.region_mask > 0
    assert [i.score for i in resp.results[0].items] == sorted([i.score for i in resp.results[0].items], reverse=True)
    up = await stub.Upsert(pb.UpsertRequest(items=[_item(10**9, q[0], genre_ids=[4])], lsn=7))
    assert up.upserted_count == 1 and up.applied_lsn == 7
    resp = await stub.Search(pb.SearchRequest(queries=encode_batch(q[:1]), k=1))
    assert resp.results[0].items[0].media_id == 10**9
    got = await stub.GetMedia(pb.GetMediaRequest(media_ids=[10**9, 123456789], include_vectors=True))
    assert [i.media_id for i in got.items] == [10**9] and list(got.missing_media_ids) == [123456789]
    assert list(got.items[0].attributes.genre_ids) == [4]
    d = await stub.Delete(pb.DeleteRequest(media_ids=[10**9, 123456789]))
    assert (d.deleted_count, d.not_found_count) == (1, 1)
    stats = await stub.GetStats(pb.GetStatsRequest())
    assert stats.item_count == len(small_catalogue) and stats.tombstone_count == 1 and list(stats.slots) == list(range(4096))
    c = await stub.Compact(pb.CompactRequest(wait=True))
    assert c.index_generation == 1
    assert (await stub.GetStats(pb.GetStatsRequest())).tombstone_count == 0
    code, _ = await _code(stub.Snapshot(pb.SnapshotRequest()))
    assert code == grpc.StatusCode.FAILED_PRECONDITION


async def test_filtered_search_returns_only_allowed(shard, small_catalogue) -> None:
    stub, _ = shard
    q = generate_queries(small_catalogue, 3)
    f = common_pb2.Filter(max_rating=1, format_mask=0b11)
    resp = await stub.Search(pb.SearchRequest(queries=encode_batch(q), k=10, filter=f, include_attributes=True))
    for r in resp.results:
        for it in r.items:
            assert it.attributes.rating <= 1 and it.attributes.format_mask & 0b11
    assert resp.allowed_count < len(small_catalogue)


@pytest.mark.parametrize("mutate, field", [
    (lambda r: r.queries.ClearField("data"), "queries.data"),
    (lambda r: setattr(r.queries, "dimension", DIM * 2), "queries.dimension"),
    (lambda r: setattr(r.queries, "count", 0), "queries.count"),
    (lambda r: setattr(r.queries, "dtype", 7), "queries.dtype"),
    (lambda r: setattr(r, "k", 0), "k"),
    (lambda r: setattr(r, "k", 51), "k"),
    (lambda r: setattr(r.params, "ef", 2**32 - 1), "params.ef"),
    (lambda r: setattr(r, "metric", 9), "metric"),
    (lambda r: setattr(r, "metric", common_pb2.METRIC_L2), "metric"),
])
async def test_search_bad_input_names_the_field(shard, mutate, field) -> None:
    stub, _ = shard
    req = pb.SearchRequest(queries=encode_batch(np.ones((2, DIM), np.float32)), k=5)
    mutate(req)
    code, details = await _code(stub.Search(req))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and details.startswith(field), details


async def test_nan_batch_limit_and_upsert_errors(shard) -> None:
    stub, _ = shard
    bad = np.ones((1, DIM), np.float32)
    bad[0, 3] = np.inf
    code, details = await _code(stub.Search(pb.SearchRequest(queries=encode_batch(bad, "float32"), k=1)))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "NaN or Inf" in details
    code, details = await _code(stub.Search(pb.SearchRequest(queries=encode_batch(np.ones((65, DIM))), k=1)))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "queries.count" in details
    v = np.ones(DIM, np.float32)
    code, details = await _code(stub.Upsert(pb.UpsertRequest(items=[_item(1, v), _item(1, v)])))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and details.startswith("items[1].media_id")
    code, details = await _code(stub.Upsert(pb.UpsertRequest()))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and details.startswith("items")
    big = encode_vector(np.full(DIM, 1e6, np.float32), "float32")
    code, details = await _code(stub.Upsert(pb.UpsertRequest(items=[common_pb2.MediaItem(media_id=3, vector=big)])))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "float16 range" in details
    code, details = await _code(stub.Upsert(pb.UpsertRequest(items=[_item(4, v, genre_ids=list(range(9)))])))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "genre_ids" in details
    code, _ = await _code(stub.Delete(pb.DeleteRequest()))
    assert code == grpc.StatusCode.INVALID_ARGUMENT


async def test_oversized_message_is_resource_exhausted(shard) -> None:
    stub, _ = shard
    huge = encode_batch(np.ones((3000, DIM), np.float32), "float32")  # 384 KiB > the 256 KiB limit
    code, _ = await _code(stub.Search(pb.SearchRequest(queries=huge, k=1)))
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED


async def test_min_lsn_not_reached_is_unavailable(shard) -> None:
    stub, _ = shard
    req = pb.SearchRequest(queries=encode_batch(np.ones((1, DIM))), k=1, min_lsn=100)
    code, _ = await _code(stub.Search(req, timeout=0.3))
    assert code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
    await stub.Upsert(pb.UpsertRequest(items=[_item(5, np.ones(DIM, np.float32))], lsn=100))
    assert (await stub.Search(req, timeout=2)).applied_lsn == 100


async def test_health_and_reflection(shard) -> None:
    _, channel = shard
    health = health_pb2_grpc.HealthStub(channel)
    assert (await health.Check(health_pb2.HealthCheckRequest(service=SERVICE))).status == 1
    refl = reflection_pb2_grpc.ServerReflectionStub(channel)
    names = []
    async for resp in refl.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")])):
        names = [s.name for s in resp.list_services_response.service]
    assert SERVICE in names and "grpc.health.v1.Health" in names


async def test_health_not_serving_until_loaded(monkeypatch) -> None:
    """The real start-up sequence: health answers NOT_SERVING while data loads, SERVING once it is loaded."""
    import contextlib

    import gmco_shard.app as shard_app

    loading, release = threading.Event(), threading.Event()

    def slow_load(store, settings, slots) -> str:
        loading.set()
        release.wait(30)
        store.mark_loaded()
        return "nothing"

    monkeypatch.setattr(shard_app, "initial_load", slow_load)
    port = free_port()
    stack = contextlib.AsyncExitStack()
    task = asyncio.create_task(shard_app.start(Settings(port=port, dim=DIM, index_backend="exact"), stack))
    try:
        assert await asyncio.to_thread(loading.wait, 30)
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
            health = health_pb2_grpc.HealthStub(ch)
            for name in ("", SERVICE):
                reply = await health.Check(health_pb2.HealthCheckRequest(service=name))
                assert reply.status == health_pb2.HealthCheckResponse.NOT_SERVING
            stub = shard_service_pb2_grpc.ShardServiceStub(ch)
            code, details = await _code(stub.Search(pb.SearchRequest(queries=encode_batch(np.ones((1, DIM))), k=1)))
            assert code == grpc.StatusCode.UNAVAILABLE and "loading" in details
            code, _ = await _code(stub.Upsert(pb.UpsertRequest(items=[_item(1, np.ones(DIM, np.float32))])))
            assert code == grpc.StatusCode.UNAVAILABLE
            assert (await stub.GetStats(pb.GetStatsRequest())).dimension == DIM
            release.set()
            await asyncio.wait_for(task, 30)
            reply = await health.Check(health_pb2.HealthCheckRequest(service=SERVICE))
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
    finally:
        release.set()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(task, 30)
        await stack.aclose()


async def test_auth_on(catalogue_dir) -> None:
    async with serve_shard(_settings(catalogue_dir, "exact", auth_token="t0k")) as svc:
        stub = svc.stub(shard_service_pb2_grpc.ShardServiceStub)
        code, _ = await _code(stub.GetStats(pb.GetStatsRequest()))
        assert code == grpc.StatusCode.UNAUTHENTICATED
        ok = await stub.GetStats(pb.GetStatsRequest(), metadata=[("authorization", "Bearer t0k")])
        assert ok.dimension == DIM
        health = health_pb2_grpc.HealthStub(svc.channel)  # probes need no token
        assert (await health.Check(health_pb2.HealthCheckRequest())).status == 1


_vectors = st.builds(
    lambda dtype, dim, count, data, k, metric, ef: pb.SearchRequest(
        queries=common_pb2.VectorBatch(data=data, dtype=dtype, dimension=dim, count=count), k=k, metric=metric,
        params=pb.SearchParams(ef=ef)),
    dtype=st.integers(0, 3), dim=st.sampled_from([0, 1, DIM, DIM + 1]), count=st.integers(0, 3),
    data=st.one_of(st.binary(max_size=300), st.just(np.ones(DIM, np.float16).tobytes()),
                   st.just(np.full(DIM * 2, np.nan, np.float16).tobytes())),
    k=st.integers(0, 60), metric=st.integers(0, 4), ef=st.one_of(st.just(0), st.integers(0, 2**32 - 1)),
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(req=_vectors)
async def test_property_search_never_internal(shard, req) -> None:
    stub, _ = shard
    try:
        await stub.Search(req)
    except grpc.aio.AioRpcError as exc:
        assert exc.code() in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.RESOURCE_EXHAUSTED), exc.details()


_items = st.lists(st.builds(
    lambda mid, dtype, dim, data, genres, pop: common_pb2.MediaItem(
        media_id=mid, vector=common_pb2.Vector(data=data, dtype=dtype, dimension=dim),
        attributes=common_pb2.MediaAttributes(genre_ids=genres, popularity=pop)),
    mid=st.integers(0, 5), dtype=st.integers(0, 3), dim=st.sampled_from([0, DIM, 3]),
    data=st.one_of(st.binary(max_size=200), st.just(np.ones(DIM, np.float16).tobytes()),
                   st.just(np.ones(DIM, np.float32).tobytes())),
    genres=st.lists(st.integers(0, 2**32 - 1), max_size=10),
    pop=st.floats(allow_nan=True, allow_infinity=True, width=32)), max_size=4)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(items=_items)
async def test_property_upsert_never_internal(shard, items) -> None:
    stub, _ = shard
    try:
        await stub.Upsert(pb.UpsertRequest(items=items))
    except grpc.aio.AioRpcError as exc:
        assert exc.code() == grpc.StatusCode.INVALID_ARGUMENT, exc.details()
    # The server is still healthy after whatever it was sent.
    assert (await stub.GetStats(pb.GetStatsRequest())).dimension == DIM


def test_sigterm_drains_in_flight_calls(small_catalogue, tmp_path) -> None:
    """A real `python -m gmco_shard` process finishes in-flight calls after SIGTERM, then exits 0."""
    save_catalogue(small_catalogue, tmp_path / "cat")
    port = free_port()
    env = {**os.environ, "GMCO_SHARD_PORT": str(port), "GMCO_SHARD_DIM": str(DIM),
           "GMCO_SHARD_INDEX_BACKEND": "exact", "GMCO_SHARD_DATA_DIR": str(tmp_path / "cat"),
           "GMCO_SHARD_GRACE_SECONDS": "10"}
    proc = subprocess.Popen([sys.executable, "-m", "gmco_shard"], env=env, stderr=subprocess.PIPE)
    try:
        wait_grpc_serving(f"127.0.0.1:{port}", timeout=60, proc=proc, service=SERVICE)

        async def drive() -> list:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
                stub = shard_service_pb2_grpc.ShardServiceStub(ch)
                await stub.GetStats(pb.GetStatsRequest())  # connected before the calls under test
                q = encode_batch(np.repeat(generate_queries(small_catalogue, 1), 64, 0))
                calls = [stub.Search(pb.SearchRequest(queries=q, k=50, params=pb.SearchParams(exact=True)))
                         for _ in range(8)]
                await asyncio.sleep(0.05)
                proc.send_signal(signal.SIGTERM)
                return await asyncio.gather(*calls, return_exceptions=True)

        results = asyncio.run(drive())
        assert all(isinstance(r, pb.SearchResponse) for r in results), [r for r in results if isinstance(r, Exception)]
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()


async def test_micro_batched_searches_match_unbatched(catalogue_dir, small_catalogue) -> None:
    async with serve_shard(_settings(catalogue_dir, "exact", batch_window_ms=5.0, batch_max=64)) as svc:
        stub = svc.stub(shard_service_pb2_grpc.ShardServiceStub)
        q = generate_queries(small_catalogue, 12)
        f = common_pb2.Filter(max_rating=3)
        calls = [stub.Search(pb.SearchRequest(queries=encode_batch(q[i:i + 1]), k=5, filter=f)) for i in range(12)]
        got = await asyncio.gather(*calls)
        want = svc.parts["store"].search(q.astype(np.float16).astype(np.float32), 5, f)
    for i, resp in enumerate(got):
        assert [it.media_id for it in resp.results[0].items] == want.media_ids[i].tolist()


async def test_searches_on_the_event_loop_answer_as_in_a_thread(catalogue_dir, small_catalogue) -> None:
    q = generate_queries(small_catalogue, 6)
    f = common_pb2.Filter(max_rating=3, excluded_media_ids=[int(m) for m in small_catalogue.media_ids[:40]])
    answers = []
    for in_thread in (True, False):
        async with serve_shard(_settings(catalogue_dir, "ivf", search_in_thread=in_thread)) as svc:
            stub = svc.stub(shard_service_pb2_grpc.ShardServiceStub)
            answers.append(await stub.Search(pb.SearchRequest(queries=encode_batch(q), k=5, filter=f, columnar=True,
                                                              include_features=True)))
    assert answers[0] == answers[1] and answers[0].results[0].media_ids


async def test_columnar_results_with_features_and_popularity(shard, small_catalogue) -> None:
    from gmco_common.features import feature_version, features

    stub, _ = shard
    q = generate_queries(small_catalogue, 3)
    items = await stub.Search(pb.SearchRequest(queries=encode_batch(q), k=7, include_vectors=True))
    cols = await stub.Search(pb.SearchRequest(queries=encode_batch(q), k=7, columnar=True, include_features=True))
    assert cols.feature_version == feature_version(DIM, 32, 20240601)
    for by_item, col in zip(items.results, cols.results, strict=True):
        ids = np.frombuffer(col.media_ids, "<u8")
        assert ids.tolist() == [i.media_id for i in by_item.items]
        assert np.allclose(np.frombuffer(col.scores, "<f4"), [i.score for i in by_item.items])
        pops = np.frombuffer(col.popularities, "<f4")
        assert np.allclose(pops, small_catalogue.popularity[ids.astype(np.int64) - 1])
        vecs = np.stack([np.frombuffer(i.vector.data, np.float16) for i in by_item.items])
        got = np.frombuffer(col.features.data, "<f4").reshape(col.features.count, col.features.dimension)
        assert np.allclose(got, features(vecs, 32, 20240601), atol=1e-6)


async def test_per_query_filters_each_get_their_own_results(shard, small_catalogue) -> None:
    stub, _ = shard
    q = generate_queries(small_catalogue, 4)
    genres = [int(g) for g in small_catalogue.genre_ids[:4, 0]]
    filters = [common_pb2.Filter(allowed_genre_ids=[g]) for g in genres[:3]] + [common_pb2.Filter()]
    batched = await stub.Search(pb.SearchRequest(queries=encode_batch(q), k=5, query_filters=filters,
                                                 include_attributes=True))
    for i, (flt, result) in enumerate(zip(filters, batched.results, strict=True)):
        alone = await stub.Search(pb.SearchRequest(queries=encode_batch(q[i:i + 1]), k=5, filter=flt))
        assert [it.media_id for it in result.items] == [it.media_id for it in alone.results[0].items]
        if flt.allowed_genre_ids:
            assert all(flt.allowed_genre_ids[0] in it.attributes.genre_ids for it in result.items)
    code, details = await _code(stub.Search(pb.SearchRequest(queries=encode_batch(q), k=5, query_filters=filters[:2])))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "query_filters" in details


async def test_popularity_order_returns_the_most_popular_allowed_items(shard, small_catalogue) -> None:
    stub, _ = shard
    flt = common_pb2.Filter(max_rating=2)
    resp = await stub.Search(pb.SearchRequest(queries=encode_batch(np.zeros((1, DIM))), k=10, filter=flt,
                                              order=pb.SEARCH_ORDER_POPULARITY, columnar=True))
    ids = np.frombuffer(resp.results[0].media_ids, "<u8").astype(np.int64)
    allowed = np.flatnonzero(small_catalogue.rating <= 2)
    want = allowed[np.argsort(-small_catalogue.popularity[allowed], kind="stable")[:10]] + 1
    assert ids.tolist() == want.tolist() and "popularity" in resp.paths
    assert np.allclose(np.frombuffer(resp.results[0].scores, "<f4"), small_catalogue.popularity[ids - 1])


async def test_one_process_serves_several_logical_shards_in_one_search(catalogue_dir, small_catalogue) -> None:
    """GMCO_SHARD_SHARD_IDS=1-2 of 4: one store with both shards' slots; a Search names each result's shard
    (by its slot); a call for other shards is FAILED_PRECONDITION naming both sets, not a wrong answer."""
    from gmco_common.slots import SlotMap

    slots = SlotMap.even(4)
    async with serve_shard(_settings(catalogue_dir, "exact", shard_count=4, shard_ids="1-2")) as svc:
        stub = svc.stub(shard_service_pb2_grpc.ShardServiceStub)
        stats = await stub.GetStats(pb.GetStatsRequest())
        assert list(stats.shard_ids) == [1, 2] and stats.shard_id == 1
        assert list(stats.slots) == slots.slots_for(1) + slots.slots_for(2)
        owned = slots.shards_of(small_catalogue.media_ids.tolist())
        assert stats.item_count == int(np.isin(owned, [1, 2]).sum())
        q = generate_queries(small_catalogue, 3)
        for shard_ids in ([], [2, 1]):
            cols = await stub.Search(pb.SearchRequest(queries=encode_batch(q), k=20, columnar=True,
                                                      shard_ids=shard_ids))
            for col in cols.results:
                ids = np.frombuffer(col.media_ids, "<u8")
                got = np.frombuffer(col.shard_ids, "<u4")
                assert len(ids) == 20 and got.tolist() == slots.shards_of(ids.tolist()).tolist()
                assert set(got.tolist()) <= {1, 2}
        items = await stub.Search(pb.SearchRequest(queries=encode_batch(q[:1]), k=10))
        assert [i.shard_id for i in items.results[0].items] == slots.shards_of(
            [i.media_id for i in items.results[0].items]).tolist()
        code, details = await _code(stub.Search(pb.SearchRequest(queries=encode_batch(q), k=5, shard_ids=[1])))
        assert code == grpc.StatusCode.FAILED_PRECONDITION
        assert "[1]" in details and "[1, 2]" in details and "GMCO_ROUTER_SHARDS" in details


def test_shard_ids_setting_is_parsed_and_bounded() -> None:
    from gmco_common.config import ConfigError
    from gmco_shard.config import parse_shard_ids

    assert parse_shard_ids("0-3, 7,5", "V") == (0, 1, 2, 3, 5, 7)
    assert Settings(port=0, shard_count=8, shard_ids="4-7").hosted_shards == (4, 5, 6, 7)
    assert Settings(port=0, shard_count=8, shard_ids="4-7").shard_id == 4
    assert Settings(port=0, shard_count=8, shard_id=3).hosted_shards == (3,)
    for bad, words in (("7-4", "empty"), ("a", "not a shard id"), ("0-9999", "at most"), (",", "no shard id"),
                       ("2-9", "SHARD_COUNT")):
        with pytest.raises(ConfigError, match=words):
            Settings(port=0, shard_count=8, shard_ids=bad)
    with pytest.raises(ConfigError, match="first of"):
        Settings(port=0, shard_count=8, shard_id=1, shard_ids="4-7")
