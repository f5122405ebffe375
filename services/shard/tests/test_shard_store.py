"""Unit tests: filters and the attribute index, segments, tombstones, background seals and merges,
compaction, the planner's paths, snapshots and the backend registry."""

from __future__ import annotations

import threading

import numpy as np
import pytest
from gmco.common.v1 import common_pb2
from gmco_catalog.log import LogEntry, Op
from gmco_common.config import ConfigError
from gmco_common.datagen import exact_ground_truth, generate_queries, save_catalogue
from gmco_common.slots import NUM_SLOTS, SlotMap, slot_of, slots_of
from gmco_shard import bitmaps, snapshot
from gmco_shard.apply import apply_entries
from gmco_shard.columns import columns_from_catalogue, columns_from_items
from gmco_shard.filters import AttributeIndex, evaluate_filter
from gmco_shard.index.base import create_index
from gmco_shard.index.exact import exact_search
from gmco_shard.index.params import HnswParams, IndexParams
from gmco_shard.loader import load_catalogue_slots
from gmco_shard.planner import ACORN, EXACT, INDEX, PREFILTER, Planner, PlannerCosts
from gmco_shard.snapshot import load_snapshot, save_snapshot
from gmco_shard.store import ShardStore
from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client import REGISTRY

DIM = 32
SMALL = IndexParams(hnsw=HnswParams(m=16, ef_construction=80, ef_search=64))


def _attrs(genres=(), rating=0, region=1, fmt=1, year=2000):
    return common_pb2.MediaAttributes(genre_ids=list(genres), rating=rating, region_mask=region, format_mask=fmt,
                                      release_year=year)


def _live_ids(store: ShardStore) -> set[int]:
    out: set[int] = set()
    for seg in store.segments():
        out |= set(seg.cols.media_ids[seg.live_rows()].tolist())
    return out


def test_filter_semantics_clause_by_clause() -> None:
    items = [common_pb2.MediaItem(media_id=i + 1, attributes=a) for i, a in enumerate([
        _attrs((1, 5), rating=2, region=0b01, fmt=0b10, year=1999),
        _attrs((2,), rating=4, region=0b10, fmt=0b01, year=2010),
        _attrs((5, 7), rating=0, region=0b11, fmt=0b11, year=2020),
    ])]
    cols = columns_from_items(items)
    F = common_pb2.Filter
    assert evaluate_filter(cols, None).tolist() == [True, True, True]
    assert evaluate_filter(cols, F(allowed_genre_ids=[5])).tolist() == [True, False, True]
    assert evaluate_filter(cols, F(blocked_genre_ids=[7])).tolist() == [True, True, False]
    assert evaluate_filter(cols, F(max_rating=2)).tolist() == [True, False, True]
    assert evaluate_filter(cols, F(max_rating=0)).tolist() == [False, False, True]  # 0 is a real ceiling
    assert evaluate_filter(cols, F(region_mask=0b10)).tolist() == [False, True, True]
    assert evaluate_filter(cols, F(format_mask=0b10)).tolist() == [True, False, True]
    assert evaluate_filter(cols, F(min_release_year=2000, max_release_year=2015)).tolist() == [False, True, False]
    assert evaluate_filter(cols, F(excluded_media_ids=[2])).tolist() == [True, False, True]
    assert evaluate_filter(cols, F(allowed_genre_ids=[5], blocked_genre_ids=[7], region_mask=1)).tolist() == [
        True, False, False]


_filters = st.builds(
    lambda allowed, blocked, rating, region, fmt, lo, hi: common_pb2.Filter(
        allowed_genre_ids=allowed, blocked_genre_ids=blocked, region_mask=region, format_mask=fmt,
        min_release_year=lo, max_release_year=hi, **({} if rating is None else {"max_rating": rating})),
    allowed=st.lists(st.integers(0, 120), max_size=4), blocked=st.lists(st.integers(0, 120), max_size=4),
    rating=st.one_of(st.none(), st.integers(0, 7)), region=st.integers(0, 255), fmt=st.integers(0, 255),
    lo=st.one_of(st.just(0), st.integers(1950, 2030)), hi=st.one_of(st.just(0), st.integers(1950, 2030)))


@settings(max_examples=80, deadline=None)
@given(f=_filters)
def test_attribute_index_matches_the_reference_filter(small_catalogue, f) -> None:
    cols = columns_from_catalogue(small_catalogue)
    index = AttributeIndex(cols)
    want = evaluate_filter(cols, f)
    got = bitmaps.to_bools(index.evaluate(f), len(cols))
    assert np.array_equal(got, want)
    assert bitmaps.to_bools(index.evaluate(f), len(cols)).sum() == want.sum()  # cached, and a fresh copy


@pytest.mark.parametrize("backend", ["exact", "hnsw", "ivf"])
def test_search_recall_and_filters(small_catalogue, make_store, backend) -> None:
    store = make_store(backend)
    q = generate_queries(small_catalogue, 20)
    gt = exact_ground_truth(small_catalogue.vectors, q, 10)
    res = store.search(q, 10)
    ids = small_catalogue.media_ids
    recall = np.mean([len(set(res.media_ids[i].tolist()) & set(ids[gt[i]].tolist())) / 10 for i in range(len(q))])
    assert recall >= (1.0 if backend == "exact" else 0.9)
    f = common_pb2.Filter(max_rating=2, region_mask=0b11)
    allow = evaluate_filter(columns_from_catalogue(small_catalogue), f)
    res = store.search(q, 10, f)
    assert res.allowed == int(allow.sum())
    returned = res.media_ids[res.rows >= 0]
    assert set(returned.tolist()) <= set(ids[allow].tolist())


def test_planner_chooses_by_allowed_rows_and_fraction() -> None:
    p = Planner(PlannerCosts(exact_max_rows=100, acorn_max_fraction=0.5))
    assert p.choose(1000, 1000, has_index=True, has_graph=True) == INDEX
    assert p.choose(1000, 80, has_index=True, has_graph=True) == EXACT
    assert p.choose(1000, 300, has_index=True, has_graph=True) == ACORN
    assert p.choose(1000, 300, has_index=True, has_graph=False) == PREFILTER
    assert p.choose(1000, 700, has_index=True, has_graph=True) == PREFILTER
    assert p.choose(1000, 700, has_index=False, has_graph=False) == EXACT
    assert p.widen(64, 1000, 700) == int(64 * 1000 / 700) and p.widen(64, 1000, 10) == 256


@pytest.mark.parametrize("fraction", [0.02, 0.1, 0.3])
def test_every_path_returns_only_allowed_rows_with_recall(small_catalogue, make_store, fraction) -> None:
    """ACORN, the widened pre-filter and exact search agree on a filter, and never return a disallowed row."""
    q = generate_queries(small_catalogue, 20)
    n = len(small_catalogue)
    allow = np.random.default_rng(5).random(n) < fraction
    picked = small_catalogue.media_ids[allow]
    # a filter that admits exactly `allow`: every other id excluded
    f = common_pb2.Filter(excluded_media_ids=small_catalogue.media_ids[~allow].tolist())
    want = exact_ground_truth(small_catalogue.vectors, q, 10, allow_mask=allow)
    for costs in (PlannerCosts(exact_max_rows=n), PlannerCosts(exact_max_rows=0, acorn_max_fraction=1.0),
                  PlannerCosts(exact_max_rows=0, acorn_max_fraction=0.0)):
        store = make_store("hnsw", planner=Planner(costs))
        res = store.search(q, 10, f, ef=128)
        assert set(res.media_ids[res.rows >= 0].tolist()) <= set(picked.tolist())
        ids = small_catalogue.media_ids
        recall = np.mean([len(set(res.media_ids[i].tolist()) & set(ids[want[i][want[i] >= 0]].tolist())) / 10
                          for i in range(len(q))])
        assert recall >= 0.9, (costs, res.paths, recall)


@pytest.mark.parametrize("path", [ACORN, PREFILTER])
def test_a_graph_path_that_comes_back_short_is_answered_exactly(small_catalogue, make_store, path) -> None:
    """A tight filter leaves a graph search few allowed neighbours: at 1 % allowed, ef 64 and k 10, ACORN
    and the pre-filter return fewer than 10 hits for most of these queries. The store answers those again
    exactly, so every answer has min(k, allowed) hits."""
    costs = {ACORN: PlannerCosts(exact_max_rows=0, acorn_max_fraction=1.0),
             PREFILTER: PlannerCosts(exact_max_rows=0, acorn_max_fraction=0.0)}[path]
    store = make_store("hnsw", planner=Planner(costs))
    q = generate_queries(small_catalogue, 30, seed=8)
    allow = np.random.default_rng(9).random(len(small_catalogue)) < 0.01
    f = common_pb2.Filter(excluded_media_ids=small_catalogue.media_ids[~allow].tolist())
    before = REGISTRY.get_sample_value("gmco_shard_short_answers_filled_total", {"path": path}) or 0.0
    res = store.search(q, 10, f, ef=64)
    filled = REGISTRY.get_sample_value("gmco_shard_short_answers_filled_total", {"path": path}) - before
    assert res.paths == (path,) and filled >= 10  # the graph came back short for at least a third
    assert ((res.rows >= 0).sum(1) == min(10, int(allow.sum()))).all()
    want = exact_ground_truth(small_catalogue.vectors, q, 10, allow_mask=allow)
    ids = small_catalogue.media_ids
    recall = np.mean([len(set(got.tolist()) & set(ids[w[w >= 0]].tolist())) / 10
                      for got, w in zip(res.media_ids, want, strict=True)])
    assert recall >= 0.95, recall


def test_kernel_scan_matches_numpy(small_catalogue) -> None:
    vectors = np.asarray(small_catalogue.vectors)
    q = generate_queries(small_catalogue, 5)
    rows = np.flatnonzero(np.random.default_rng(1).random(len(vectors)) < 0.1)
    for metric in ("ip", "l2"):
        s, r = exact_search(vectors, q, 7, metric, rows=rows)
        xf = vectors[rows].astype(np.float32)
        ref = q @ xf.T if metric == "ip" else -((q[:, None] - xf[None]) ** 2).sum(-1)
        assert np.array_equal(r, rows[np.argsort(-ref, axis=1, kind="stable")[:, :7]])
        s2, r2 = exact_search(vectors, q, 7, metric, allow=bitmaps.from_rows(rows, len(vectors)))
        assert np.array_equal(r2, r) and np.allclose(s2, s)


def test_kernel_rows_f32_equals_numpy_conversion(small_catalogue) -> None:
    import gmco_kernels

    vectors = np.ascontiguousarray(small_catalogue.vectors, dtype=np.float16)
    rows = np.random.default_rng(2).integers(0, len(vectors), 57)
    assert np.array_equal(gmco_kernels.rows_f32(vectors, rows), vectors[rows].astype(np.float32))
    assert gmco_kernels.rows_f32(vectors, rows[:0]).shape == (0, vectors.shape[1])
    with pytest.raises(IndexError):
        gmco_kernels.rows_f32(vectors, np.array([len(vectors)]))
    with pytest.raises(TypeError):
        gmco_kernels.rows_f32(vectors.astype(np.float32), rows)


def test_excluded_ids_are_cleared_by_the_id_index_not_the_attribute_index(small_catalogue, make_store) -> None:
    store = make_store("ivf")
    ids = small_catalogue.media_ids
    q = generate_queries(small_catalogue, 3)
    first = store.search(q, 10, common_pb2.Filter(region_mask=0b1))
    seen = [int(m) for m in first.media_ids[:, :5].reshape(-1)]
    f = common_pb2.Filter(region_mask=0b1, excluded_media_ids=seen)
    res = store.search(q, 10, f)
    assert not set(res.media_ids[res.rows >= 0].tolist()) & set(seen)
    assert res.allowed == int(evaluate_filter(columns_from_catalogue(small_catalogue), f).sum())
    assert set(seen) <= set(ids.tolist())


def test_growing_segment_tombstones_and_upsert_replacement(small_catalogue, make_store) -> None:
    store = make_store("hnsw")
    target = np.asarray(small_catalogue.vectors[7], np.float32)
    new_id = np.uint64(10**9)
    store.upsert(np.array([new_id]), target[None].astype(np.float16), [_attrs((3,))])
    res = store.search(target[None], 3)
    assert int(new_id) in res.media_ids[0].tolist()  # found exactly in the growing segment
    store.delete(np.array([small_catalogue.media_ids[7], new_id]))
    res = store.search(target[None], 3)
    assert int(new_id) not in res.media_ids[0] and int(small_catalogue.media_ids[7]) not in res.media_ids[0]
    # Replacing an id tombstones the old row: only the new vector is found.
    mid = small_catalogue.media_ids[9]
    store.upsert(np.array([mid]), (-target)[None].astype(np.float16), [_attrs()])
    assert store.stats()["item_count"] == len(small_catalogue) - 1
    got = store.get([int(mid)])[0]
    assert np.allclose(got[1].astype(np.float32), -target, atol=1e-2)


@pytest.mark.parametrize("path", [EXACT, ACORN, PREFILTER, INDEX])
def test_a_delete_hides_a_row_on_every_path(small_catalogue, make_store, path) -> None:
    costs = {EXACT: PlannerCosts(exact_max_rows=10**9), ACORN: PlannerCosts(exact_max_rows=0, acorn_max_fraction=1.0),
             PREFILTER: PlannerCosts(exact_max_rows=0, acorn_max_fraction=0.0),
             INDEX: PlannerCosts(exact_max_rows=0)}[path]
    store = make_store("hnsw", planner=Planner(costs))
    target = np.asarray(small_catalogue.vectors[11], np.float32)[None]
    victim = int(small_catalogue.media_ids[11])
    flt = common_pb2.Filter(region_mask=int(small_catalogue.region_mask[11])) if path != INDEX else None
    assert victim in store.search(target, 5, flt, ef=64).media_ids[0].tolist()
    store.delete(np.array([victim], np.uint64))
    res = store.search(target, 5, flt, ef=64)
    assert victim not in res.media_ids[0].tolist()
    assert path in res.paths or (path == INDEX and PREFILTER in res.paths)  # a tombstone is a filter too


def test_writes_seal_into_segments_in_the_background_without_full_rebuilds(small_catalogue, make_store) -> None:
    store = make_store("hnsw", seal_rows=200, merge_factor=3)
    base = store.segments()[0]
    rng = np.random.default_rng(3)
    vectors = np.asarray(small_catalogue.vectors)
    written = []
    for i in range(1400):
        mid = 50_000 + i
        store.upsert(np.array([mid], np.uint64), vectors[i % 3000][None], [_attrs()])
        written.append(mid)
        if i % 7 == 0:
            store.delete(np.array([small_catalogue.media_ids[rng.integers(0, 3000)]], np.uint64))
        while store.maintain() is not None:
            pass
        assert store.segments()[-1].n < 2 * 200  # exactly scanned rows stay bounded
    assert store.segments()[0] is base  # the 3000-row segment was never rebuilt
    assert set(written) <= _live_ids(store)
    assert store.stats()["item_count"] == len(_live_ids(store))
    target = vectors[5][None].astype(np.float32)
    assert 50_005 in store.search(target, 5).media_ids[0].tolist()  # ANN-searchable in a sealed segment


def test_a_bulk_catch_up_defers_builds_then_indexes_the_burst_in_one(small_catalogue, make_store) -> None:
    """While builds are deferred (replication applying a burst), frozen segments wait, searched exactly;
    past defer_max_rows, or once the deferral ends, every frozen segment goes into one build."""
    import time

    store = make_store("ivf", seal_rows=200)
    vectors = np.asarray(small_catalogue.vectors)
    store.defer_builds_until = time.monotonic() + 60
    store.defer_max_rows = 5000
    ids = np.arange(70_000, 71_000, dtype=np.uint64)
    store.upsert(ids, vectors[:1000], [_attrs()] * 1000)
    frozen = [s for s in store.segments() if s.frozen]
    assert len(frozen) == 4 and not store.needs_maintenance() and store.maintain() is None
    got = store.search(vectors[7][None].astype(np.float32), 5).media_ids[0].tolist()
    assert 70_007 in got  # the waiting rows are searched (exactly)
    store.defer_max_rows = 800  # over the bound: builds anyway, all frozen segments at once
    assert store.maintain() == "seal"
    assert not any(s.frozen for s in store.segments())
    assert [s.n for s in store.segments() if s.sealed][-1] == 800
    store.defer_max_rows, store.defer_builds_until = 5000, 0.0
    assert set(ids.tolist()) <= _live_ids(store)
    assert store.stats()["item_count"] == len(_live_ids(store))


def test_ivf_keeps_the_unfiltered_budget_when_only_tombstones_filter(small_catalogue, make_store) -> None:
    """Tombstones alone (a shard taking writes) must not widen an IVF search: the same lists as unfiltered,
    no allowed-row quota; a real filter still widens."""
    store = make_store("ivf")
    seg = max(store.segments(), key=lambda s: s.n)
    index = seg.index
    assert index is not None and index.lists > 8
    n = index.count
    assert index.filtered_budget(4, 10, n) == (4, 0)
    assert index.filtered_budget(4, 10, n - n // 50) == (4, 0)  # 2% dead
    lists, quota = index.filtered_budget(4, 10, n // 10)
    assert lists > 4 and quota >= 300
    ids = np.asarray(seg.cols.media_ids[: seg.n])[:: 50]
    store.delete(ids)
    q = generate_queries(small_catalogue, 3)
    got = store.search(q, 10).media_ids
    assert not set(got.ravel().tolist()) & set(ids.tolist())


def _ivf_segment(make_store, **kw):
    store = make_store("ivf", **kw)
    seg = max(store.segments(), key=lambda s: s.n)
    assert seg.index is not None and seg.index.lists > 8
    return store, seg, seg.index


def test_ivf_bound_stops_the_scan_where_no_list_left_can_do_better(small_catalogue, make_store) -> None:
    """The kernel's bound rule: with every bound above any score it probes every list, with every bound
    below any score it stops after min_lists; and the lists' own bounds match the exact filtered top 10."""
    import gmco_kernels

    _, seg, index = _ivf_segment(make_store)
    q = generate_queries(small_catalogue, 1)[0]
    allow = bitmaps.full(seg.n)
    order = np.arange(index.lists)
    high = np.full(index.lists, np.inf, np.float32)
    low = np.full(index.lists, -np.inf, np.float32)
    args = (q, index.vectors, index._offsets, order, 10, 3, 0, 0, allow, "ip")
    assert gmco_kernels.ivf_scan(*args, bound=high)[2] == index.lists
    assert gmco_kernels.ivf_scan(*args, bound=low)[2] == 3
    with pytest.raises(ValueError, match="one value per list"):
        gmco_kernels.ivf_scan(*args, bound=high[:-1])
    # the spreads are each list's RMS distance from its centroid
    lo, hi = int(index._offsets[0]), int(index._offsets[1])
    rows = np.asarray(index.vectors[lo:hi], np.float32)
    want = np.sqrt(((rows - index._centroids[0]) ** 2).sum(1).mean())
    assert index._spread[0] == pytest.approx(want, rel=1e-4)


def test_ivf_filter_blocking_the_query_neighbourhood_keeps_recall(small_catalogue, make_store) -> None:
    """The case a quota rule gets wrong: the query's own genres blocked, so its nearest allowed rows lie in
    other clusters. The bound rule scans on until no list is expected to hold a better row."""
    store, _, _ = _ivf_segment(make_store, planner=Planner(PlannerCosts(exact_max_rows=0)))
    q = generate_queries(small_catalogue, 20, seed=3)
    full = exact_ground_truth(small_catalogue.vectors, q, 10)
    cols = columns_from_catalogue(small_catalogue)
    ids = small_catalogue.media_ids
    genres = np.unique(small_catalogue.genre_ids[:, 0])
    rng = np.random.default_rng(4)
    recalls, scanned = [], []
    for i in range(len(q)):
        own = {int(g) for g in small_catalogue.genre_ids[full[i], 0]}
        others = rng.choice([g for g in genres.tolist() if g not in own], 2, replace=False).tolist()
        f = common_pb2.Filter(blocked_genre_ids=sorted(own | set(others)))
        allow = evaluate_filter(cols, f)
        assert 0.05 < allow.mean() < 0.95
        want = exact_ground_truth(small_catalogue.vectors, q[i:i + 1], 10, allow_mask=allow)[0]
        res = store.search(q[i:i + 1], 10, f, ef=2)
        assert set(res.media_ids[0].tolist()) <= set(ids[allow].tolist())
        recalls.append(len(set(res.media_ids[0].tolist()) & set(ids[want].tolist())) / 10)
        scanned.append(res.paths)
    assert np.mean(recalls) >= 0.95, recalls
    assert all(p == (PREFILTER,) for p in scanned)


def test_ivf_snapshot_without_list_spreads_recomputes_them(small_catalogue, make_store, tmp_path) -> None:
    """A snapshot written before the lists kept their spreads loads, with the same spreads and results."""
    store, _, index = _ivf_segment(make_store)
    import json

    directory, _ = save_snapshot(store, tmp_path)
    meta = json.loads((directory / "meta.json").read_text())
    dropped = [rel for rel in meta["files"] if rel.endswith("ivf_spread.npy")]
    assert dropped
    for rel in dropped:  # the layout an older snapshot has: no spreads, and none listed
        (directory / rel).unlink()
        del meta["files"][rel]
    (directory / "meta.json").write_text(json.dumps(meta))
    restored = ShardStore(DIM, "ivf", store.params)
    load_snapshot(restored, tmp_path)
    got = max(restored.segments(), key=lambda s: s.n).index
    assert np.allclose(got._spread, index._spread)
    q = generate_queries(small_catalogue, 5)
    f = common_pb2.Filter(blocked_genre_ids=[0, 1])
    assert np.array_equal(restored.search(q, 10, f).media_ids, store.search(q, 10, f).media_ids)


def test_background_seals_swap_atomically_under_concurrent_searches_and_writes(small_catalogue, make_store) -> None:
    store = make_store("hnsw", seal_rows=150, merge_factor=3)
    q = generate_queries(small_catalogue, 5)
    vectors = np.asarray(small_catalogue.vectors)
    errors: list[BaseException] = []
    stop = threading.Event()
    deleted = set(small_catalogue.media_ids[:40].tolist())

    def reader():
        while not stop.is_set():
            try:
                r = store.search(q, 10)
                assert (r.rows >= 0).all()
                assert not deleted & set(r.media_ids.ravel().tolist())
            except BaseException as exc:  # noqa: BLE001
                errors.append(exc)
                return

    def maintainer():
        while not stop.is_set():
            try:
                if store.maintain() is None:
                    stop.wait(0.005)
            except BaseException as exc:  # noqa: BLE001
                errors.append(exc)
                return

    store.delete(np.asarray(sorted(deleted), np.uint64))
    threads = [threading.Thread(target=reader), threading.Thread(target=maintainer)]
    for t in threads:
        t.start()
    for i in range(900):
        store.upsert(np.array([70_000 + i], np.uint64), vectors[i][None], [_attrs()])
        if i % 10 == 0:
            store.delete(np.array([70_000 + i - 5], np.uint64))
    stop.set()
    for t in threads:
        t.join()
    assert not errors, errors[0]
    live = _live_ids(store)
    assert {70_000 + i for i in range(900) if (i + 5) % 10 != 0} <= live
    assert not {70_000 + i - 5 for i in range(0, 900, 10)} & live
    assert not deleted & live


@pytest.mark.parametrize("backend", ["exact", "hnsw", "ivf"])
@pytest.mark.parametrize("step", ["seal", "compact"])
def test_writes_during_a_rebuild_are_carried_into_the_new_segment(small_catalogue, make_store, backend,
                                                                  step) -> None:
    """Deletes and replacing upserts that land while a segment is being rebuilt (between the rebuild reading
    its sources and the swap) hit the new segment's rows of those ids, in whatever row order its index laid
    them out (IVF groups rows by list)."""
    store = make_store(backend, seal_rows=100)
    vectors = np.asarray(small_catalogue.vectors)
    new_ids = np.arange(90_000, 90_150, dtype=np.uint64)
    store.upsert(new_ids, vectors[:150], [_attrs()] * 150)  # 100 frozen rows and 50 growing ones
    old_ids = small_catalogue.media_ids
    expected = set(old_ids.tolist()) | set(new_ids.tolist())
    doomed = np.concatenate([new_ids[3:100:9], old_ids[5:3000:97]]).astype(np.uint64)
    replaced = np.concatenate([new_ids[1:100:13], old_ids[7:3000:131]]).astype(np.uint64)
    build = store._seal

    def seal_then_write(*args, **kw):  # the writes arrive while the index is being built
        segment = build(*args, **kw)
        store.delete(doomed)
        store.upsert(replaced, vectors[-replaced.shape[0]:], [_attrs(rating=9)] * replaced.shape[0])
        return segment

    store._seal = seal_then_write  # type: ignore[method-assign]
    if step == "seal":  # the 100 frozen rows; the base segment's rows are written in place
        assert store.maintain() == "seal"
    else:  # every segment, the 3000-row base too
        store.compact()
    expected = (expected - set(doomed.tolist())) | set(replaced.tolist())  # deleted, then some written again
    live = []
    for seg in store.segments():
        live += seg.cols.media_ids[seg.live_rows()].tolist()
    assert len(live) == len(set(live)), "an id is live in two segments"
    assert set(live) == expected
    for mid, found in zip(replaced.tolist(), store.get(replaced.tolist()), strict=True):
        assert found is not None and found[2].rating == 9, mid  # the replacing version, not the rebuilt one


def test_compaction_swaps_atomically_while_writes_continue(small_catalogue, make_store) -> None:
    store = make_store("hnsw")
    q = generate_queries(small_catalogue, 5)
    store.delete(small_catalogue.media_ids[:50])
    before = store.search(q, 10)
    errors: list[Exception] = []
    stop = threading.Event()

    def reader():
        while not stop.is_set():
            try:
                r = store.search(q, 10)
                assert (r.rows >= 0).all()
            except Exception as exc:  # noqa: BLE001
                errors.append(exc)

    def writer():
        for i in range(200):
            store.upsert(np.array([20_000 + i], np.uint64), small_catalogue.vectors[i:i + 1], [_attrs()])
        store.delete(small_catalogue.media_ids[100:110])

    generation = store.generation
    threads = [threading.Thread(target=reader), threading.Thread(target=writer)]
    for t in threads:
        t.start()
    store.compact()
    threads[1].join()
    stop.set()
    threads[0].join()
    assert not errors
    assert store.generation > generation
    st = store.stats()
    assert st["item_count"] == len(small_catalogue) - 60 + 200
    deleted = set(small_catalogue.media_ids[:50].tolist()) | set(small_catalogue.media_ids[100:110].tolist())
    after = store.search(q, 10)
    assert (after.rows >= 0).all() and not deleted & set(after.media_ids.ravel().tolist())
    assert not deleted & set(before.media_ids.ravel().tolist())
    assert store.get([int(small_catalogue.media_ids[105])]) == [None]
    store.compact()
    assert store.stats()["growing_count"] == 0 and store.stats()["tombstone_count"] == 0


@pytest.mark.parametrize("backend", ["exact", "hnsw", "ivf"])
def test_snapshot_restores_identical_results_for_every_segment_layout(small_catalogue, make_store, tmp_path,
                                                                      backend) -> None:
    """A sealed base segment, a small sealed one, a frozen one and the growing one all round-trip."""
    store = make_store(backend, seal_rows=100)
    vectors = np.asarray(small_catalogue.vectors)
    store.upsert(np.arange(90_000, 90_100, dtype=np.uint64), vectors[:100], [_attrs()] * 100, lsn=40)
    store.maintain()  # seals the first 100 into a segment of their own
    store.upsert(np.arange(90_100, 90_150, dtype=np.uint64), vectors[100:150], [_attrs()] * 50, lsn=41)
    store.upsert(np.array([99_999], np.uint64), vectors[:1], [_attrs()], lsn=42)
    store.delete(np.concatenate([small_catalogue.media_ids[:5], [90_003, 90_120]]).astype(np.uint64), lsn=43)
    assert len(store.segments()) >= 3
    q = generate_queries(small_catalogue, 10)
    f = common_pb2.Filter(region_mask=0b101)
    want = store.search(q, 10, f)
    save_snapshot(store, tmp_path)
    save_snapshot(store, tmp_path)  # replacing an older snapshot; the previous one is kept as a fallback
    assert len([p for p in tmp_path.iterdir() if p.name.startswith("snap-")]) == 2
    restored = ShardStore(DIM, backend, store.params)
    assert load_snapshot(restored, tmp_path) == 43
    got = restored.search(q, 10, f)
    assert np.array_equal(got.media_ids, want.media_ids) and np.allclose(got.scores, want.scores)
    assert restored.stats()["item_count"] == store.stats()["item_count"]
    assert _live_ids(restored) == _live_ids(store)


def test_snapshot_cut_with_several_unsealed_segments_restores_them_all(small_catalogue, make_store, tmp_path) -> None:
    """Cut while writes go on: frozen segments still waiting for their index beside the growing one,
    more live rows together than one growing segment holds. All of them come back."""
    store = make_store("exact", seal_rows=100)
    vectors = np.asarray(small_catalogue.vectors)
    for i in range(5):  # 5 x 50 rows: frozen segments of 100 rows and a growing one, none sealed yet
        ids = np.arange(80_000 + 50 * i, 80_050 + 50 * i, dtype=np.uint64)
        store.upsert(ids, vectors[50 * i:50 * i + 50], [_attrs()] * 50, lsn=10 + i)
    unsealed = [seg for seg in store.segments() if not seg.sealed]
    assert sum(seg.live for seg in unsealed) > 100, "the layout this test needs did not come about"
    save_snapshot(store, tmp_path)
    restored = ShardStore(DIM, "exact", store.params, seal_rows=100)
    assert load_snapshot(restored, tmp_path) == 14
    assert _live_ids(restored) == _live_ids(store)


@pytest.mark.parametrize("arr", [np.arange(12, dtype=np.float16).reshape(3, 4), np.zeros(0, np.uint64),
                                 np.array([True, False, True]), np.arange(70_000, dtype=np.uint64)[::2]])
def test_snapshot_arrays_are_hashed_as_written(tmp_path, arr, monkeypatch) -> None:
    """The checksum a save records is computed while writing; it must be the one a load recomputes from
    the file, and the file must read back as the array (chunk boundaries included)."""
    monkeypatch.setattr(snapshot, "_CHUNK", 4096)
    path = tmp_path / "a.npy"
    assert snapshot._save_array(path, arr) == snapshot._checksum(path)
    back = np.load(path)
    assert back.dtype == arr.dtype and np.array_equal(back, arr)


def test_snapshot_refuses_other_settings(small_catalogue, make_store, tmp_path) -> None:
    save_snapshot(make_store(), tmp_path)
    with pytest.raises(ValueError, match="dimension"):
        load_snapshot(ShardStore(DIM * 2, "exact", IndexParams()), tmp_path)


def test_loader_takes_only_own_slots(small_catalogue, tmp_path) -> None:
    save_catalogue(small_catalogue, tmp_path)
    smap = SlotMap.even(3)
    owned = np.zeros(NUM_SLOTS, bool)
    owned[smap.slots_for(1)] = True
    store = ShardStore(DIM, "exact", IndexParams())
    n = load_catalogue_slots(store, tmp_path, owned, progress=False)
    ids = sorted(_live_ids(store))
    assert len(ids) == n and all(smap.shard_of(m) == 1 for m in ids)
    assert abs(n - len(small_catalogue) / 3) < len(small_catalogue) * 0.05
    assert slot_of(ids[0]) in smap.slots_for(1)


def test_registry_names_what_to_install() -> None:
    with pytest.raises(ConfigError, match="unknown index backend"):
        create_index("annoy", 8, IndexParams())
    with pytest.raises(ConfigError, match="unknown metric"):
        create_index("exact", 8, IndexParams(metric="cosine"))


def test_compaction_drops_slots_no_longer_owned(make_store, small_catalogue) -> None:
    """After resharding moves slots away, the next compaction lets go of their rows."""
    ids = small_catalogue.media_ids
    slots = slots_of(ids.tolist())
    owned = np.ones(NUM_SLOTS, bool)
    owned[np.unique(slots)[:100]] = False  # these slots moved to another shard
    store = make_store(owned_slots=np.flatnonzero(owned).tolist())
    store.compact()
    kept = np.asarray(sorted(_live_ids(store)), np.uint64)
    assert owned[slots_of(kept.tolist())].all()
    assert len(kept) == int(owned[slots].sum()) < len(ids)
    moved = int(ids[~owned[slots]][0])
    assert store.get([moved]) == [None]


# -- applying catalogue-log entries in batches (gmco_shard.apply) ------------------------------------------

def _entry(lsn: int, media_id: int, vector: np.ndarray | None = None, attrs: common_pb2.MediaAttributes | None = None,
           op: int = Op.UPSERT, raw_vector: bytes | None = None, raw_attrs: bytes | None = None) -> LogEntry:
    if op != Op.UPSERT:
        return LogEntry(lsn, slot_of(media_id), op, media_id, None, None)
    vec = raw_vector if raw_vector is not None else np.asarray(vector, "<f2").tobytes()
    blob = raw_attrs if raw_attrs is not None else (attrs or _attrs()).SerializeToString()
    return LogEntry(lsn, slot_of(media_id), op, media_id, vec, blob)


def _vec(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(DIM).astype(np.float16)


def _skipped(reason: str) -> float:
    return REGISTRY.get_sample_value("gmco_shard_log_entries_skipped_total", {"reason": reason}) or 0.0


def _empty_store() -> ShardStore:
    store = ShardStore(DIM, "exact", SMALL, seal_rows=64)
    store.mark_loaded()
    return store


def _contents(store: ShardStore) -> dict[int, tuple[bytes, bytes]]:
    """Live id -> (vector bytes, attributes bytes), from every segment."""
    out: dict[int, tuple[bytes, bytes]] = {}
    for m in sorted(_live_ids(store)):
        _, vector, attrs = store.get([m])[0]
        out[m] = (vector.tobytes(), attrs.SerializeToString(deterministic=True))
    return out


def test_apply_a_batch_with_an_id_upserted_twice_keeps_the_later_write() -> None:
    store = _empty_store()
    apply_entries(store, [_entry(1, 7, _vec(1), _attrs((1,), rating=1)), _entry(2, 8, _vec(2)),
                          _entry(3, 7, _vec(3), _attrs((2,), rating=3))], 3)
    got = store.get([7])[0]
    assert got is not None and got[1].tobytes() == _vec(3).tobytes() and got[2] == _attrs((2,), rating=3)
    assert store.stats()["item_count"] == 2
    # the same in a store where id 7 already lives in a sealed segment
    store = _empty_store()
    store.bulk_load(_vec(0)[None], columns_from_items([common_pb2.MediaItem(media_id=7, attributes=_attrs())]))
    apply_entries(store, [_entry(1, 7, _vec(1)), _entry(2, 7, _vec(3))], 2)
    assert store.get([7])[0][1].tobytes() == _vec(3).tobytes() and store.stats()["item_count"] == 1


def test_apply_a_batch_with_an_upsert_then_a_delete_of_the_id_deletes_it() -> None:
    store = _empty_store()
    apply_entries(store, [_entry(1, 5, _vec(5))], 1)  # lives before the batch
    apply_entries(store, [_entry(2, 5, _vec(6)), _entry(3, 9, _vec(9)), _entry(4, 5, op=Op.DELETE),
                          _entry(5, 11, _vec(11)), _entry(6, 11, op=Op.DELETE)], 6)
    got = store.get([5, 9, 11])
    assert got[0] is None and got[2] is None and got[1][1].tobytes() == _vec(9).tobytes()
    assert _live_ids(store) == {9}


def test_apply_a_batch_with_a_delete_then_an_upsert_of_the_id_keeps_the_upsert() -> None:
    store = _empty_store()
    apply_entries(store, [_entry(1, 5, _vec(5)), _entry(2, 6, _vec(6))], 2)
    apply_entries(store, [_entry(3, 5, op=Op.DELETE), _entry(4, 5, _vec(50), _attrs((4,))),
                          _entry(5, 12, op=Op.DELETE), _entry(6, 12, _vec(12))], 6)
    assert _live_ids(store) == {5, 6, 12}
    got = store.get([5])[0]
    assert got[1].tobytes() == _vec(50).tobytes() and got[2] == _attrs((4,))


_u64 = st.integers(0, (1 << 64) - 1)
_attributes = st.builds(
    lambda genres, rating, region, fmt, year, pop: common_pb2.MediaAttributes(
        genre_ids=genres, rating=rating, region_mask=region, format_mask=fmt, release_year=year, popularity=pop),
    genres=st.lists(st.integers(0, (1 << 31) - 1), max_size=8), rating=st.integers(0, 255), region=_u64, fmt=_u64,
    year=st.integers(0, 9999), pop=st.floats(0, allow_infinity=False, allow_nan=False, width=32) | st.just(-0.0))


@settings(max_examples=60, deadline=None)
@given(attrs=st.lists(_attributes, min_size=1, max_size=40))
def test_apply_round_trips_attributes_and_vectors_exactly(attrs) -> None:
    store = _empty_store()
    entries = [_entry(i + 1, 1000 + i, _vec(i), a) for i, a in enumerate(attrs)]
    assert apply_entries(store, entries, len(entries)) == 0
    for i, a in enumerate(attrs):
        _, vector, got = store.get([1000 + i])[0]
        assert vector.tobytes() == _vec(i).tobytes()
        # bytes, not ==: -0.0 must stay -0.0 and every field must come back as it went in
        assert got.SerializeToString(deterministic=True) == a.SerializeToString(deterministic=True)


def test_apply_skips_poison_entries_in_a_batch_and_keeps_what_came_before() -> None:
    store = _empty_store()
    good = _vec(1)
    nan = np.full(DIM, np.nan, np.float16)
    entries = [
        _entry(1, 1, good), _entry(2, 1, raw_vector=good.tobytes()[:-2]),  # wrong size: id 1 keeps lsn 1
        _entry(3, 2, good), _entry(4, 2, nan),  # not finite
        _entry(5, 3, good), _entry(6, 3, raw_vector=good.tobytes(), raw_attrs=b"\xff\xff\xff"),  # undecodable
        _entry(7, 4, good), _entry(8, 4, good, _attrs(rating=300)),  # out of bounds
        _entry(9, 5, good, common_pb2.MediaAttributes(genre_ids=list(range(9)))),  # 9 genres: out of bounds
        _entry(10, 6, good), LogEntry(11, slot_of(6), 9, 6, None, None),  # an op this version does not know
        _entry(12, 7, good),
    ]
    reasons = ("vector_size", "vector_not_finite", "attributes_undecodable", "attributes_out_of_bounds", "unknown_op")
    before = [_skipped(r) for r in reasons]
    assert apply_entries(store, entries, 12) == 6
    assert [_skipped(r) - b for r, b in zip(reasons, before, strict=True)] == [1, 1, 1, 2, 1]
    assert _live_ids(store) == {1, 2, 3, 4, 6, 7}
    for media_id in (1, 2, 3, 4):  # the earlier valid write stands
        assert store.get([media_id])[0][1].tobytes() == good.tobytes()
    assert store.applied_lsn == 12


def test_apply_moves_applied_lsn_to_the_batch_end_only_after_its_rows_are_in() -> None:
    seen: list[tuple[str, int]] = []

    class Watching(ShardStore):
        def upsert(self, *args, **kw):
            n = super().upsert(*args, **kw)
            seen.append(("upsert", self.applied_lsn))
            return n

        def delete(self, *args, **kw):
            n = super().delete(*args, **kw)
            seen.append(("delete", self.applied_lsn))
            return n

    store = Watching(DIM, "exact", SMALL)
    store.mark_loaded()
    apply_entries(store, [_entry(1, 1, _vec(1))], 1)
    seen.clear()
    apply_entries(store, [_entry(2, 2, _vec(2)), _entry(3, 1, op=Op.DELETE), _entry(4, 3, _vec(3))], 9)
    assert sorted(seen) == [("delete", 1), ("upsert", 1)]  # neither write moved it
    assert store.applied_lsn == 9  # the scanned lsn, past the last entry
    assert _live_ids(store) == {2, 3}
    apply_entries(store, [], 12)  # nothing of our slots in the scanned range
    assert store.applied_lsn == 12


_ops = st.lists(st.tuples(st.sampled_from([Op.UPSERT, Op.UPSERT, Op.DELETE, "poison"]), st.integers(1, 6),
                          st.integers(0, 3)), max_size=40)


@settings(max_examples=80, deadline=None)
@given(before=_ops, batch=_ops)
def test_apply_a_batch_equals_applying_its_entries_one_by_one(before, batch) -> None:
    """Against the reference (every entry its own batch): the same live rows with the same contents."""
    def entries(ops, first_lsn):
        out = []
        for k, (op, media_id, seed) in enumerate(ops):
            lsn = first_lsn + k
            if op == "poison":
                out.append(_entry(lsn, media_id, raw_vector=b"\x00" * 6))
            elif op == Op.DELETE:
                out.append(_entry(lsn, media_id, op=Op.DELETE))
            else:
                out.append(_entry(lsn, media_id, _vec(seed), _attrs((seed,), rating=seed)))
        return out

    first = entries(before, 1)
    second = entries(batch, len(first) + 1)
    one_by_one, batched = _empty_store(), _empty_store()
    for e in first + second:
        apply_entries(one_by_one, [e], e.lsn)
    apply_entries(batched, first, len(first))
    apply_entries(batched, second, len(first) + len(second))
    assert _contents(batched) == _contents(one_by_one)
    assert batched.applied_lsn == len(first) + len(second)


async def test_replication_applying_a_burst_defers_builds_and_a_trickle_does_not(make_store) -> None:
    """Replication marks a bulk catch-up (entries/s over its window at least bulk_rate) on the store, for
    BULK_HOLD_SECONDS past the burst; a few entries at a time leave builds alone; bulk_rate 0 never defers."""
    import time

    from gmco_shard.replication import BULK_HOLD_SECONDS, Replication

    store = make_store("exact", seal_rows=200)
    burst = Replication(None, list(range(4096)), store, bulk_rate=5000)  # type: ignore[arg-type]
    await burst._apply([_entry(i + 1, 90_000 + i, _vec(i)) for i in range(10)], 10)
    assert store.defer_builds_until == 0.0  # 10 entries: a trickle
    await burst._apply([_entry(i + 11, 90_010 + i, _vec(i)) for i in range(3000)], 3010)
    assert time.monotonic() < store.defer_builds_until <= time.monotonic() + BULK_HOLD_SECONDS
    assert not store.needs_maintenance()  # 3,010 rows wait in frozen segments
    store.defer_builds_until = 0.0
    assert store.needs_maintenance() and store.maintain() == "seal"
    never = make_store("exact", seal_rows=200)
    off = Replication(None, list(range(4096)), never, bulk_rate=0)  # type: ignore[arg-type]
    await off._apply([_entry(i + 1, 95_000 + i, _vec(i)) for i in range(3000)], 3000)
    assert never.defer_builds_until == 0.0 and never.needs_maintenance()
