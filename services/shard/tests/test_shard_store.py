"""Unit tests: filters, segments, tombstones, compaction, snapshots and the backend registry."""

from __future__ import annotations

import threading

import numpy as np
import pytest
from gmco.common.v1 import common_pb2
from gmco_common.config import ConfigError
from gmco_common.datagen import exact_ground_truth, generate_queries
from gmco_common.slots import NUM_SLOTS, SlotMap, slot_of
from gmco_shard.filters import columns_from_catalogue, columns_from_items, evaluate_filter
from gmco_shard.index.base import IndexParams, create_index
from gmco_shard.index.exact import exact_search
from gmco_shard.loader import load_catalogue_slots
from gmco_shard.snapshot import load_snapshot, save_snapshot
from gmco_shard.store import ShardStore

DIM = 32


def _attrs(genres=(), rating=0, region=1, fmt=1, year=2000):
    return common_pb2.MediaAttributes(genre_ids=list(genres), rating=rating, region_mask=region, format_mask=fmt,
                                      release_year=year)


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


@pytest.mark.parametrize("backend", ["exact", "hnsw"])
def test_search_recall_and_filters(small_catalogue, make_store, backend) -> None:
    store = make_store(backend)
    q = generate_queries(small_catalogue, 20)
    gt = exact_ground_truth(small_catalogue.vectors, q, 10)
    res = store.search(q, 10)
    recall = np.mean([len(set(res.rows[i]) & set(gt[i])) / 10 for i in range(len(q))])
    assert recall >= (1.0 if backend == "exact" else 0.9)
    f = common_pb2.Filter(max_rating=2, region_mask=0b11)
    allow = evaluate_filter(columns_from_catalogue(small_catalogue), f)
    res = store.search(q, 10, f)
    assert res.allowed == int(allow.sum())
    returned = res.rows[res.rows >= 0]
    assert allow[returned].all()


def test_selective_filter_goes_exact(small_catalogue, make_store) -> None:
    store = make_store("hnsw", exact_fraction=0.05)
    q = generate_queries(small_catalogue, 3)
    few = common_pb2.Filter(excluded_media_ids=[], allowed_genre_ids=[int(small_catalogue.genre_ids[0, 0])],
                            max_rating=0, region_mask=1, format_mask=1)
    res = store.search(q, 5, few)
    assert res.exact and res.allowed <= 0.05 * len(small_catalogue)
    assert not store.search(q, 5).exact


@pytest.mark.parametrize("metric", ["ip", "l2"])
@pytest.mark.parametrize("batch", [1, 9])  # the faiss selector scan, then BLAS over the float32 storage
def test_hnsw_exact_path_matches_fp16_exact_search(metric, batch) -> None:
    rng = np.random.default_rng(4)
    vectors = rng.standard_normal((500, DIM)).astype(np.float16)
    index = create_index("hnsw", DIM, IndexParams(metric=metric, hnsw_m=8, hnsw_ef_construction=40))
    index.build(vectors)
    queries = rng.standard_normal((batch, DIM)).astype(np.float32)
    for allow in (rng.random(500) < 0.1, np.eye(1, 500, 7, dtype=bool)[0]):  # 10%, and one row (< k)
        want_s, want_r = exact_search(vectors, queries, 5, metric, np.flatnonzero(allow))
        got_s, got_r = index.exact_search(queries, 5, allow)
        assert np.array_equal(got_r, want_r)
        assert np.allclose(got_s, want_s, rtol=1e-4, atol=1e-3) or np.array_equal(got_s, want_s)
        assert allow[got_r[got_r >= 0]].all()


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

    threads = [threading.Thread(target=reader), threading.Thread(target=writer)]
    for t in threads:
        t.start()
    new = store.compact()
    threads[1].join()
    stop.set()
    threads[0].join()
    assert not errors
    assert new.generation == 1
    st = store.stats()
    assert st["item_count"] == len(small_catalogue) - 60 + 200
    deleted = set(small_catalogue.media_ids[:50].tolist()) | set(small_catalogue.media_ids[100:110].tolist())
    after = store.search(q, 10)
    assert (after.rows >= 0).all() and not deleted & set(after.media_ids.ravel().tolist())
    assert not deleted & set(before.media_ids.ravel().tolist())
    assert store.get([int(small_catalogue.media_ids[105])]) == [None]
    store.compact()
    assert store.stats()["growing_count"] == 0 and store.stats()["tombstone_count"] == 0


@pytest.mark.parametrize("backend", ["exact", "hnsw"])
def test_snapshot_restores_identical_results(small_catalogue, make_store, tmp_path, backend) -> None:
    store = make_store(backend)
    store.upsert(np.array([99_999], np.uint64), small_catalogue.vectors[:1], [_attrs()], lsn=42)
    store.delete(small_catalogue.media_ids[:5], lsn=43)
    q = generate_queries(small_catalogue, 10)
    f = common_pb2.Filter(region_mask=0b101)
    want = store.search(q, 10, f)
    save_snapshot(store, tmp_path)
    save_snapshot(store, tmp_path)  # replacing an older snapshot
    assert len([p for p in tmp_path.iterdir() if p.name.startswith("snap-")]) == 1
    restored = ShardStore(DIM, backend, store.params)
    assert load_snapshot(restored, tmp_path) == 43
    got = restored.search(q, 10, f)
    assert np.array_equal(got.media_ids, want.media_ids) and np.allclose(got.scores, want.scores)
    assert restored.stats() == store.stats()


def test_snapshot_refuses_other_settings(small_catalogue, make_store, tmp_path) -> None:
    save_snapshot(make_store(), tmp_path)
    with pytest.raises(ValueError, match="dimension"):
        load_snapshot(ShardStore(DIM * 2, "exact", IndexParams()), tmp_path)


def test_loader_takes_only_own_slots(small_catalogue, make_store, tmp_path) -> None:
    from gmco_common.datagen import save_catalogue

    save_catalogue(small_catalogue, tmp_path)
    smap = SlotMap.even(3)
    owned = np.zeros(NUM_SLOTS, bool)
    owned[smap.slots_for(1)] = True
    store = ShardStore(DIM, "exact", IndexParams())
    n = load_catalogue_slots(store, tmp_path, owned, progress=False)
    ids = store.table.cols.media_ids[:n]
    assert all(smap.shard_of(int(m)) == 1 for m in ids)
    assert abs(n - len(small_catalogue) / 3) < len(small_catalogue) * 0.05
    assert slot_of(int(ids[0])) in smap.slots_for(1)


def test_registry_names_what_to_install() -> None:
    with pytest.raises(ConfigError, match="unknown index backend"):
        create_index("annoy", 8, IndexParams())
    with pytest.raises(ConfigError, match="unknown metric"):
        create_index("exact", 8, IndexParams(metric="cosine"))


def test_compaction_drops_slots_no_longer_owned(make_store, small_catalogue) -> None:
    """After resharding moves slots away, the next compaction lets go of their rows."""
    from gmco_common.slots import slots_of

    store = make_store()
    ids = small_catalogue.media_ids
    slots = slots_of(ids.tolist())
    owned = np.ones(NUM_SLOTS, bool)
    owned[np.unique(slots)[:100]] = False  # these slots moved to another shard
    store.owned_slots = owned
    store.compact()
    kept = store.table.cols.media_ids[: store.table.n]
    assert owned[slots_of(kept.tolist())].all()
    assert len(kept) == int(owned[slots].sum()) < len(ids)
    moved = int(ids[~owned[slots]][0])
    assert store.get([moved]) == [None]
