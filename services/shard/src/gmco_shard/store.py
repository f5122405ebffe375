"""Segments of one shard: a sealed segment with an ANN index, a growing segment searched exactly, and
tombstones.

All rows live in one preallocated table (vectors as FP16 plus attribute columns). Rows ``[0, sealed)``
are covered by the sealed index; rows ``[sealed, n)`` form the growing segment. A delete or a
replacing upsert clears the row's ``alive`` bit (a tombstone). Compaction copies the live rows into a
fresh table, builds its index off the lock, then carries over what changed meanwhile and swaps the
new table in with one reference assignment, so a search always sees a whole index.

Filtered searches evaluate the ``Filter`` in numpy into an allow mask (it also counts the allowed rows and
picks exact search when few pass). An index that takes a mask gets the mask; a
:class:`~gmco_shard.index.base.FilteringIndex` (Milvus) gets the ``Filter`` and the sealed tombstones instead.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from gmco.common.v1 import common_pb2
from gmco_common.slots import NUM_SLOTS, slots_of

from gmco_shard.filters import (
    AttributeColumns,
    empty_columns,
    evaluate_filter,
    is_trivial,
    read_attributes,
    write_attributes,
)
from gmco_shard.index.base import FilteringIndex, IndexParams, VectorIndex, create_index, topk
from gmco_shard.index.exact import exact_search

log = logging.getLogger(__name__)

# Below this allowed fraction, exact search over the allowed rows beats the HNSW pre-filter: measured by
# `make bench-shard` (100k x 1024): the pre-filtered index lost recall (0.94 at 9.8% allowed, ef 256)
# and its speed edge shrank to parity near 5%; exact is exact. See docs/benchmarks.md, "Shard".
EXACT_FRACTION = 0.10


@dataclass
class Table:
    vectors: np.ndarray  # float16 (capacity, dim)
    cols: AttributeColumns
    alive: np.ndarray  # bool (capacity,)
    n: int  # rows in use
    sealed: int  # rows covered by index
    index: VectorIndex
    generation: int = 0

    @property
    def capacity(self) -> int:
        return self.vectors.shape[0]


@dataclass(frozen=True)
class SearchResult:
    scores: np.ndarray  # (q, k)
    media_ids: np.ndarray  # (q, k) uint64, 0 where empty
    rows: np.ndarray  # (q, k) rows in the table used, -1 where empty
    table: Table
    allowed: int
    exact: bool


def _build_sealed(table: Table, progress: bool) -> None:
    """Build ``table``'s index over its sealed rows; a FilteringIndex also gets their attribute columns."""
    vectors = table.vectors[: table.sealed]
    if isinstance(table.index, FilteringIndex):
        table.index.build_with_columns(vectors, table.cols.head(table.sealed), progress=progress)
    else:
        table.index.build(vectors, progress=progress)


def exact_sealed(table: Table, queries: np.ndarray, k: int, allow: np.ndarray,
                 metric: str) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k over the sealed rows set in ``allow``: the index's own exact path where it has one
    (HNSW's float32 storage, GPU brute force on the device copy), else the segment's FP16 rows."""
    if hasattr(table.index, "exact_search"):
        return table.index.exact_search(queries, k, allow)
    return exact_search(table.vectors, queries, k, metric, np.flatnonzero(allow))


class ShardStore:
    def __init__(self, dim: int, backend: str, params: IndexParams, exact_fraction: float = EXACT_FRACTION,
                 capacity: int = 1024, owned_slots: Sequence[int] | None = None) -> None:
        self.dim = dim
        self.backend = backend
        self.params = params
        # Below this fraction of allowed sealed rows, search exactly over the allowed rows.
        self.exact_fraction = exact_fraction
        self._lock = threading.RLock()
        self._compact_lock = threading.Lock()
        self._ids: dict[int, int] = {}  # media_id -> row of its live version
        self.table = self._new_table(capacity)
        self.applied_lsn = 0
        self.compacting = False
        # False until the start-up data is in (bulk load, snapshot, or mark_loaded for an empty start).
        self.loaded = False
        # Slots this shard owns (bool over the 4096 slots); compaction drops rows of other slots,
        # which is how a shard lets go of slots moved away by resharding. None = keep everything.
        self.owned_slots: np.ndarray | None = None
        if owned_slots is not None:
            self.owned_slots = np.zeros(NUM_SLOTS, bool)
            self.owned_slots[list(owned_slots)] = True

    def mark_loaded(self) -> None:
        self.loaded = True

    # -- construction -------------------------------------------------------------------------
    def _new_table(self, capacity: int, index: VectorIndex | None = None, generation: int = 0) -> Table:
        return Table(np.zeros((capacity, self.dim), np.float16), empty_columns(capacity),
                     np.zeros(capacity, bool), 0, 0, index or create_index(self.backend, self.dim, self.params),
                     generation)

    def bulk_load(self, vectors: np.ndarray, cols: AttributeColumns, progress: bool = False) -> None:
        """Replace everything with ``vectors``/``cols`` and build the sealed index over them."""
        n = vectors.shape[0]
        table = self._new_table(max(n + n // 4, 1024))
        table.vectors[:n] = vectors
        for name in cols.__dataclass_fields__:
            getattr(table.cols, name)[:n] = getattr(cols, name)
        table.alive[:n] = True
        table.n = table.sealed = n
        _build_sealed(table, progress)
        with self._lock:
            self.table = table
            self._ids = {int(m): r for r, m in enumerate(table.cols.media_ids[:n])}
            self.loaded = True

    # -- writes ---------------------------------------------------------------------------------
    def _grow(self, need: int) -> None:
        t = self.table
        if t.n + need <= t.capacity:
            return
        cap = max(t.capacity * 2, t.n + need)
        vectors = np.zeros((cap, self.dim), np.float16)
        vectors[: t.n] = t.vectors[: t.n]
        cols = empty_columns(cap)
        for name in cols.__dataclass_fields__:
            getattr(cols, name)[: t.n] = getattr(t.cols, name)[: t.n]
        alive = np.zeros(cap, bool)
        alive[: t.n] = t.alive[: t.n]
        # The sealed index keeps pointing at its own rows: they are unchanged in the new arrays.
        if t.index.name == "exact":  # it only references rows; point it at the new array
            t.index.build(vectors[: t.sealed])
        self.table = Table(vectors, cols, alive, t.n, t.sealed, t.index, t.generation)

    def upsert(self, media_ids: np.ndarray, vectors: np.ndarray,
               attrs: list[common_pb2.MediaAttributes], lsn: int = 0) -> int:
        with self._lock:
            self._grow(len(media_ids))
            t = self.table
            for i, mid in enumerate(media_ids):
                mid = int(mid)
                old = self._ids.get(mid)
                if old is not None:
                    t.alive[old] = False
                row = t.n
                t.vectors[row] = vectors[i]
                write_attributes(t.cols, row, mid, attrs[i])
                t.alive[row] = True
                t.n += 1
                self._ids[mid] = row
            self.applied_lsn = max(self.applied_lsn, lsn)
            return len(media_ids)

    def delete(self, media_ids: np.ndarray, lsn: int = 0) -> int:
        deleted = 0
        with self._lock:
            for mid in media_ids:
                row = self._ids.pop(int(mid), None)
                if row is not None:
                    self.table.alive[row] = False
                    deleted += 1
            self.applied_lsn = max(self.applied_lsn, lsn)
        return deleted

    def mark_applied(self, lsn: int) -> None:
        with self._lock:
            self.applied_lsn = max(self.applied_lsn, lsn)

    # -- reads ----------------------------------------------------------------------------------
    def get(self, media_ids: list[int]) -> list[tuple[int, np.ndarray, common_pb2.MediaAttributes] | None]:
        with self._lock:
            t = self.table
            rows = [self._ids.get(int(m)) for m in media_ids]
            return [None if r is None else (m, t.vectors[r].copy(), read_attributes(t.cols, r))
                    for m, r in zip(media_ids, rows, strict=True)]

    def search(self, queries: np.ndarray, k: int, flt: common_pb2.Filter | None = None, ef: int = 0,
               force_exact: bool = False) -> SearchResult:
        """Filtered top-k over sealed and growing rows. Thread-safe; runs without the write lock."""
        t = self.table
        n, sealed = t.n, t.sealed
        metric = self.params.metric
        q = np.asarray(queries, dtype=np.float32)
        allow = t.alive[:n].copy()
        if not is_trivial(flt):
            allow &= evaluate_filter(t.cols.head(n), flt)
        allowed = int(allow.sum())
        sealed_allow = allow[:sealed]
        sealed_allowed = int(sealed_allow.sum())
        exact = force_exact or sealed == 0 or sealed_allowed <= max(k, self.exact_fraction * sealed)
        if sealed_allowed == 0:
            s1 = np.full((q.shape[0], k), -np.inf, np.float32)
            r1 = np.full((q.shape[0], k), -1, np.int64)
        elif exact:
            s1, r1 = exact_sealed(t, q, k, sealed_allow, metric)
        else:
            pre = None if sealed_allowed == sealed else sealed_allow
            if pre is not None and isinstance(t.index, FilteringIndex):
                # The backend filters natively: the Filter itself, plus the tombstones it cannot know about.
                s1, r1 = t.index.search_filter(q, k, flt, np.flatnonzero(~t.alive[:sealed]), ef)
            else:
                s1, r1 = t.index.search(q, k, pre, ef)
        growing = np.flatnonzero(allow[sealed:]) + sealed
        if growing.size:
            s2, r2 = exact_search(t.vectors, q, k, metric, growing)
            s1, r1 = topk(np.concatenate([s1, s2], 1), np.concatenate([r1, r2], 1), k)
        ids = np.where(r1 >= 0, t.cols.media_ids[np.maximum(r1, 0)], 0).astype(np.uint64)
        return SearchResult(s1, ids, r1, t, allowed, exact)

    # -- compaction -----------------------------------------------------------------------------
    def compact(self, progress: bool = False) -> Table:
        """Fold growing rows and tombstones into a fresh sealed index; swap it in atomically."""
        with self._compact_lock:
            self.compacting = True
            try:
                with self._lock:
                    old = self.table
                    n0 = old.n
                    live = old.alive[:n0].copy()
                    if self.owned_slots is not None:
                        live &= self.owned_slots[slots_of(old.cols.media_ids[:n0].tolist())]
                    keep = np.flatnonzero(live)
                    new = self._new_table(max(len(keep) + len(keep) // 4, 1024), generation=old.generation + 1)
                    new.vectors[: len(keep)] = old.vectors[keep]
                    for name in new.cols.__dataclass_fields__:
                        getattr(new.cols, name)[: len(keep)] = getattr(old.cols, name)[keep]
                    new.alive[: len(keep)] = True
                    new.n = new.sealed = len(keep)
                # The expensive part runs without the lock: writes and searches go on against `old`.
                _build_sealed(new, progress)
                with self._lock:
                    cur = self.table
                    remap = np.full(n0, -1, np.int64)
                    remap[keep] = np.arange(len(keep))
                    # Rows deleted or replaced while building.
                    gone = keep[~cur.alive[keep]]
                    new.alive[remap[gone]] = False
                    # Rows appended while building become the new growing segment.
                    extra = cur.n - n0
                    if new.n + extra > new.capacity:
                        self.table = new
                        self._grow(extra)
                        new = self.table
                    new.vectors[new.n:new.n + extra] = cur.vectors[n0:cur.n]
                    for name in new.cols.__dataclass_fields__:
                        getattr(new.cols, name)[new.n:new.n + extra] = getattr(cur.cols, name)[n0:cur.n]
                    new.alive[new.n:new.n + extra] = cur.alive[n0:cur.n]
                    new.n += extra
                    ids = new.cols.media_ids[: new.n]
                    live = np.flatnonzero(new.alive[: new.n])
                    self._ids = {int(ids[r]): int(r) for r in live}
                    self.table = new
                    log.info("compaction: generation %d, %d sealed rows, %d growing", new.generation,
                             new.sealed, new.n - new.sealed)
                    return new
            finally:
                self.compacting = False

    # -- stats ----------------------------------------------------------------------------------
    def stats(self) -> dict[str, Any]:
        t = self.table
        alive = t.alive[: t.n]
        return {
            "item_count": int(alive.sum()),
            "sealed_count": t.sealed,
            "growing_count": t.n - t.sealed,
            "tombstone_count": int(t.n - alive.sum()),
            "index_bytes": t.index.nbytes,
            "vector_bytes": t.n * self.dim * 2,
            "index_generation": t.generation,
        }
