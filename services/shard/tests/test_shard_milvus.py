"""The milvus backend against real Milvus: build, search, filtered search, tombstones, snapshot reconnect,
compaction, retirement, the Filter -> expression equivalence, and error mapping (also through gRPC).

The contract tests run twice, through the module-scoped ``target``: on Milvus Lite files under a temporary
directory, and on the session's Milvus 2.3.5 standalone server (``milvus_server``, gmco_testing.milvus),
where each build makes its own collection."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
import pytest
from gmco.common.v1 import common_pb2
from gmco.shard.v1 import shard_service_pb2 as pb
from gmco.shard.v1 import shard_service_pb2_grpc
from gmco_common.config import ConfigError
from gmco_common.datagen import generate_queries
from gmco_common.errors import (
    DeadlineExceeded,
    FailedPrecondition,
    InvalidArgument,
    ResourceExhausted,
    Unavailable,
)
from gmco_common.vectors import encode_batch
from gmco_shard import bitmaps
from gmco_shard.columns import columns_from_catalogue
from gmco_shard.config import Settings
from gmco_shard.filters import evaluate_filter
from gmco_shard.index.exact import exact_search
from gmco_shard.index.milvus import MilvusIndex, milvus_error, vector_dtype
from gmco_shard.index.milvus_filter import ROW, filter_expression
from gmco_shard.index.params import HnswParams, IndexParams, MilvusParams
from gmco_shard.snapshot import load_snapshot, save_snapshot
from gmco_shard.store import ShardStore
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pymilvus.exceptions import ConnectError, MilvusException, ParamError
from pymilvus.grpc_gen import common_pb2 as milvus_common
from shard_testkit import serve_shard, shard_settings, write_catalogue

DIM = 32
K = 10
HIGH = np.uint64(1 << 63)


def _params(uri: str, **milvus: object) -> IndexParams:
    return IndexParams(hnsw=HnswParams(m=16, ef_construction=80, ef_search=128),
                       milvus=MilvusParams(uri=uri, collection="t", **milvus))  # type: ignore[arg-type]


def _sealed(store: ShardStore):
    """The store's (one) sealed segment."""
    (seg,) = [s for s in store.segments() if s.sealed]
    return seg


@dataclass(frozen=True)
class Target:
    """Where a test's collections live: a Milvus Lite file per name, or the session's Milvus server."""

    directory: Path | None = None
    server_uri: str = ""

    def uri(self, name: str) -> str:
        return str(self.directory / f"{name}.db") if self.directory is not None else self.server_uri


@pytest.fixture(scope="module", params=["lite", "server"])
def target(request, tmp_path_factory) -> Target:
    if request.param == "lite":
        return Target(directory=tmp_path_factory.mktemp("milvus"))
    return Target(server_uri=request.getfixturevalue("milvus_server").uri)


@pytest.fixture(scope="module")
def columns(small_catalogue):
    cols = columns_from_catalogue(small_catalogue)
    cols.media_ids[1::2] |= HIGH  # half the ids above 2**63: they travel as negative INT64s
    return cols


@pytest.fixture(scope="module")
def milvus_store(small_catalogue, columns, target) -> ShardStore:
    store = ShardStore(DIM, "milvus", _params(target.uri("shard")))
    store.bulk_load(np.asarray(small_catalogue.vectors), columns)
    return store


@pytest.fixture(scope="module")
def exact_store(small_catalogue, columns) -> ShardStore:
    store = ShardStore(DIM, "exact", IndexParams())
    store.bulk_load(np.asarray(small_catalogue.vectors), columns)
    return store


def _recall(got: np.ndarray, want: np.ndarray) -> float:
    return float(np.mean([len(set(g[g > 0].tolist()) & set(w[w > 0].tolist())) / max(1, (w > 0).sum())
                          for g, w in zip(got, want, strict=True)]))


def _allowed_rows(index: MilvusIndex, expr: str) -> set[int]:
    hits = index._call("query", "query", index.collection, filter=expr, output_fields=[ROW], limit=16384)
    return {int(h[ROW]) for h in hits}


# -- Filter -> expression ---------------------------------------------------------------------------
_genre = st.one_of(st.integers(0, 110), st.integers(2**31, 2**32 - 1))
_filters = st.builds(
    common_pb2.Filter,
    allowed_genre_ids=st.lists(_genre, max_size=6),
    blocked_genre_ids=st.lists(_genre, max_size=4),
    max_rating=st.one_of(st.none(), st.integers(0, 7)),
    region_mask=st.one_of(st.just(0), st.integers(1, 255), st.integers(0, 2**64 - 1)),
    format_mask=st.one_of(st.just(0), st.integers(1, 255)),
    min_release_year=st.one_of(st.just(0), st.integers(1940, 2030)),
    max_release_year=st.one_of(st.just(0), st.integers(1940, 2030)),
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(f=_filters, excluded=st.lists(st.integers(0, 2999), max_size=20),
       hidden=st.lists(st.integers(0, 2999), max_size=20, unique=True))
def test_expression_selects_exactly_what_numpy_allows(milvus_store, columns, f, excluded, hidden) -> None:
    f.excluded_media_ids.extend(int(columns.media_ids[r]) for r in excluded)
    hidden_rows = np.asarray(sorted(hidden), np.int64)
    want = evaluate_filter(columns, f)
    want[hidden_rows] = False
    got = _allowed_rows(_sealed(milvus_store).index, filter_expression(f, hidden_rows))
    assert got == set(np.flatnonzero(want).tolist())


def test_trivial_filter_has_no_expression() -> None:
    assert filter_expression(None) == "" and filter_expression(common_pb2.Filter()) == ""
    assert filter_expression(common_pb2.Filter(allowed_genre_ids=[2**32 - 1])) == f"{ROW} < 0"


# -- search -------------------------------------------------------------------------------------------
def test_unfiltered_search_matches_exact(milvus_store, exact_store, small_catalogue) -> None:
    q = generate_queries(small_catalogue, 20, seed=3)
    got, want = milvus_store.search(q, K), exact_store.search(q, K)
    assert not got.exact and _recall(got.media_ids, want.media_ids) >= 0.95
    top = np.flatnonzero(got.rows[:, 0] >= 0)
    np.testing.assert_allclose(got.scores[top, 0], want.scores[top, 0], rtol=1e-3, atol=1e-3)


def test_filtered_search_returns_only_allowed_items(milvus_store, exact_store, columns,
                                                    small_catalogue) -> None:
    q = generate_queries(small_catalogue, 20, seed=4)
    f = common_pb2.Filter(blocked_genre_ids=[1, 2, 3], max_rating=4, region_mask=0b1111,
                          excluded_media_ids=[int(m) for m in columns.media_ids[:200]])
    allow = evaluate_filter(columns, f)
    assert 0.05 < allow.mean() < 0.95  # the index path, not the exact fallback
    got, want = milvus_store.search(q, K, f), exact_store.search(q, K, f)
    assert not got.exact
    allowed_ids = set(columns.media_ids[allow].tolist())
    assert set(got.media_ids[got.rows >= 0].tolist()) <= allowed_ids
    assert ((got.rows >= 0).sum(1) == K).all()  # a short Milvus answer is answered again exactly
    assert _recall(got.media_ids, want.media_ids) >= 0.9


def test_allow_mask_search(milvus_store) -> None:
    """The allow mask travels as a row expression, and every hit is an allowed row. Most answers are full,
    not all: under load, Milvus 2.3.5's HNSW now and then answers one query of a filtered batch with no hits
    for a while after a load (milvus-io/milvus#28603; it failed this test in CI, 1 query of 4, and again here
    under two busy cores: the same query empty 4 times in a row, full a moment later). The store answers such
    queries again by the exact scan (test_a_graph_path_that_comes_back_short_is_answered_exactly)."""
    index = _sealed(milvus_store).index
    allow = np.zeros(index.count, bool)
    allow[::3] = True
    vectors = _sealed(milvus_store).vectors
    _, rows = index.search(np.asarray(vectors[:12], np.float32), K, bitmaps.from_bools(allow), ef=256)
    hit = rows >= 0
    assert hit.any() and (rows[hit] % 3 == 0).all()
    assert (hit.sum(1) == K).sum() >= 9, hit.sum(1)


def test_tombstones_and_growing_rows(small_catalogue, columns, target) -> None:
    store = ShardStore(DIM, "milvus", _params(target.uri("tombstones")))
    store.bulk_load(np.asarray(small_catalogue.vectors[:1000]), columns.head(1000))
    q = np.asarray(small_catalogue.vectors[:3], np.float32)
    first = store.search(q, K, common_pb2.Filter(max_rating=9)).media_ids[:, 0]
    store.delete(first)
    vec = np.asarray(small_catalogue.vectors[5:6]) * 1.0
    store.upsert(np.asarray([77_777], np.uint64), vec, [common_pb2.MediaAttributes(rating=1)])
    res = store.search(q, K, common_pb2.Filter(max_rating=9))
    assert not set(first.tolist()) & set(res.media_ids.ravel().tolist())
    assert 77_777 in store.search(vec.astype(np.float32), K, common_pb2.Filter(max_rating=1)).media_ids

    # Compaction builds a new collection; the growing row and the deletes carry over.
    old_index = _sealed(store).index
    old = old_index.collection
    store.compact()
    new_index = _sealed(store).index
    assert new_index.collection != old and store.stats()["sealed_count"] == 1000 - 3 + 1
    assert 77_777 in store.search(vec.astype(np.float32), K).media_ids
    assert not set(first.tolist()) & set(store.search(q, K).media_ids.ravel().tolist())
    # What the store does RETIRE_DELAY_SECONDS after the swap: the replaced collection is dropped.
    assert new_index._call("check", "has_collection", old)
    old_index.retire()
    assert old_index.collection is None and not new_index._call("check", "has_collection", old)


def test_snapshot_reconnects_to_the_collection(milvus_store, target, small_catalogue, tmp_path) -> None:
    path, _ = save_snapshot(milvus_store, tmp_path)
    other = ShardStore(DIM, "milvus", _params(target.uri("shard")))
    load_snapshot(other, tmp_path)
    q = generate_queries(small_catalogue, 5, seed=9)
    np.testing.assert_array_equal(other.search(q, K).media_ids, milvus_store.search(q, K).media_ids)
    assert (path / "seg-000" / "milvus.json").is_file()


def test_vectors_are_float32_on_lite_and_on_a_2_3_server(milvus_store) -> None:
    # Lite has no FLOAT16_VECTOR; Milvus 2.3.5 has one that scores wrongly: vector_type=auto avoids both.
    assert _sealed(milvus_store).index.vector_dtype == np.float32


def test_float16_on_a_2_3_server_is_refused(milvus_server, small_catalogue) -> None:
    index = MilvusIndex(DIM, _params(milvus_server.uri, vector_type="float16"))
    with pytest.raises(FailedPrecondition, match="GMCO_SHARD_MILVUS_VECTOR_TYPE=auto"):
        index.build(np.asarray(small_catalogue.vectors[:10]))
    assert index.collection is None


def test_index_type_the_server_lacks_is_failed_precondition(milvus_server, small_catalogue) -> None:
    index = MilvusIndex(DIM, _params(milvus_server.uri, index_type="HNSW_SQ"))  # HNSW_SQ: Milvus 2.5+
    before = set(index._call("list", "list_collections"))
    with pytest.raises(FailedPrecondition, match="invalid index type.*GMCO_SHARD_MILVUS_INDEX_TYPE"):
        index.build(np.asarray(small_catalogue.vectors[:10]))
    assert set(index._call("list", "list_collections")) == before  # the failed build dropped its collection


def test_missing_collection_is_failed_precondition(small_catalogue, columns, target, tmp_path) -> None:
    store = ShardStore(DIM, "milvus", _params(target.uri("gone")))
    store.bulk_load(np.asarray(small_catalogue.vectors[:500]), columns.head(500))
    save_snapshot(store, tmp_path / "snap")
    index = _sealed(store).index
    index._call("drop", "drop_collection", index.collection)
    with pytest.raises(FailedPrecondition, match="no collection"):
        store.search(np.asarray(small_catalogue.vectors[:1], np.float32), K)
    # A snapshot whose collection is gone is refused at load (logged), and the replica rebuilds from its
    # catalogue instead of serving nothing.
    assert load_snapshot(ShardStore(DIM, "milvus", _params(target.uri("gone"))), tmp_path / "snap") is None


def test_unreachable_milvus_is_unavailable(small_catalogue, columns) -> None:
    from gmco_testing.procs import free_port

    store = ShardStore(DIM, "milvus", _params(f"http://127.0.0.1:{free_port()}", timeout_seconds=1.0))
    with pytest.raises(Unavailable, match="unreachable"):
        store.bulk_load(np.asarray(small_catalogue.vectors[:100]), columns.head(100))


# -- error mapping -----------------------------------------------------------------------------------
_S = MilvusParams(uri="http://milvus:19530")


@pytest.mark.parametrize(("exc", "expected"), [
    (MilvusException(100, "collection not found[secret]"), FailedPrecondition),
    (MilvusException(8, "rate limit exceeded[secret]", milvus_common.RateLimit), ResourceExhausted),
    (MilvusException(1, "quota[secret]", milvus_common.DiskQuotaExhausted), ResourceExhausted),
    (MilvusException(1, "denied[secret]", milvus_common.PermissionDenied), FailedPrecondition),
    (MilvusException(101, "not loaded[secret]"), Unavailable),
    (MilvusException(grpc.StatusCode.DEADLINE_EXCEEDED, "slow[secret]"), DeadlineExceeded),
    (MilvusException(grpc.StatusCode.UNAVAILABLE, "down[secret]"), Unavailable),
    (ConnectError(message="refused[secret]"), Unavailable),
    (MilvusException(65535, "boom[secret]"), Unavailable),
])
def test_milvus_errors_map_to_precise_codes_without_raw_text(exc, expected) -> None:
    err = milvus_error(exc, "search", _S)
    assert type(err) is expected
    assert "[secret]" not in err.message and "Milvus" in err.message


def test_a_refused_setting_names_it() -> None:
    err = milvus_error(MilvusException(65535, "invalid index type: HNSW_SQ"), "create index", _S,
                       setting="GMCO_SHARD_MILVUS_INDEX_TYPE")
    assert isinstance(err, FailedPrecondition) and "GMCO_SHARD_MILVUS_INDEX_TYPE" in err.message
    assert "invalid index type: HNSW_SQ" in err.message


def test_input_errors_name_the_field() -> None:
    err = milvus_error(ParamError(message="ef out of range"), "search", _S, field="params.ef")
    assert isinstance(err, InvalidArgument) and err.field == "params.ef" and "ef out of range" in err.reason
    assert isinstance(milvus_error(ParamError(message="bad"), "build", _S), FailedPrecondition)


def test_configuration_is_checked(tmp_path) -> None:
    with pytest.raises(ConfigError, match="MILVUS_URI"):
        Settings(index_backend="milvus")
    params = Settings(index_backend="milvus", milvus_uri="x.db", shard_id=0, replica_id=2).index_params()
    assert params.milvus.collection == "gmco_shard_0_r2" and params.milvus.uri == "x.db"
    with pytest.raises(ConfigError, match="FLOAT16"):
        MilvusIndex(DIM, _params(str(tmp_path / "a.db"), vector_type="float16"))
    with pytest.raises(ConfigError, match="METRIC=ip"):
        MilvusIndex(DIM, IndexParams(metric="l2", milvus=MilvusParams(uri="a.db")))
    with pytest.raises(ConfigError, match="INDEX_PARAMS"):
        MilvusIndex(DIM, _params("a.db", index_params="[1]"))
    remote = MilvusIndex(DIM, _params("http://milvus:19530", index_type="GPU_CAGRA"))
    assert remote.vector_dtype == np.float16 and "graph_degree" in remote.build_params
    server = MilvusParams(uri="http://milvus:19530")  # vector_type=auto: FP16 from Milvus 2.4 on
    assert vector_dtype(server, "v2.4.13") == np.float16 and vector_dtype(server, "2.5.0") == np.float16
    assert vector_dtype(server, "v2.3.5-lite") == np.float32 and vector_dtype(server, "master-2024") == np.float32


# -- through gRPC ------------------------------------------------------------------------------------
async def test_grpc_search_and_error_status(small_catalogue, target, tmp_path) -> None:
    data_dir = write_catalogue(small_catalogue.subset(np.arange(800)), tmp_path / "cat")
    settings_ = shard_settings(data_dir, index_backend="milvus", milvus_uri=target.uri("grpc"),
                               hnsw_ef_search=128)
    async with serve_shard(settings_) as svc:
        stub = svc.stub(shard_service_pb2_grpc.ShardServiceStub)
        store = svc.parts["store"]
        q = np.asarray(small_catalogue.vectors[:2], np.float32)
        f = common_pb2.Filter(max_rating=3)
        resp = await stub.Search(pb.SearchRequest(queries=encode_batch(q), k=K, filter=f,
                                                  include_attributes=True))
        assert all(0 < len(r.items) <= K and all(i.attributes.rating <= 3 for i in r.items)
                   for r in resp.results)
        seg = _sealed(store)
        cols = seg.cols
        want = exact_search(seg.vectors[:800], q, K, "ip", np.flatnonzero(evaluate_filter(cols.head(800), f)))[1]
        got = np.asarray([[i.media_id for i in r.items] for r in resp.results], np.uint64)
        assert _recall(got, cols.media_ids[want]) >= 0.9

        index = seg.index
        index._call("drop", "drop_collection", index.collection)
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.Search(pb.SearchRequest(queries=encode_batch(q), k=K, filter=f))
        assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "Compact" in err.value.details() and "Traceback" not in err.value.details()
