"""Segments: the units a shard's rows live in (the Lucene/Milvus way of living with indexes that cannot be
updated in place).

- The **growing** segment takes upserts: rows are appended (vectors FP16, attribute columns), looked up by
  a dict, and searched exactly (it is bounded by ``seal_rows``, so an exact scan stays cheap).
- When it fills it is **frozen** (still searched exactly) while a background task builds an ANN index over
  its live rows; the result, a **sealed** segment, replaces it atomically.
- A **sealed** segment is immutable but for its tombstones: vectors (for HNSW, the index's own FP16
  storage: one copy), columns, an alive bitmap, the ANN index, the attribute index for filters and a
  sorted id index. Sealed segments are merged in the background (``store.maintain``).

A search reads a segment's ``n`` once and then only rows below it, so appends never disturb it.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

import numpy as np

from gmco_shard import bitmaps
from gmco_shard.columns import AttributeColumns, empty_columns
from gmco_shard.filters import AttributeIndex
from gmco_shard.index.base import VectorIndex

_ids = itertools.count(1)


class IdIndex:
    """Row of each media id in a sealed segment (ids are unique there): sorted ids and their rows."""

    def __init__(self, media_ids: np.ndarray) -> None:
        order = np.argsort(media_ids, kind="stable")
        self._sorted = np.ascontiguousarray(media_ids[order])
        self._rows = order.astype(np.int64 if media_ids.shape[0] >= 1 << 31 else np.int32)

    def rows_of(self, media_ids: np.ndarray) -> np.ndarray:
        """The row of each id, -1 where the segment does not hold it."""
        ids = np.asarray(media_ids, np.uint64)
        if self._sorted.shape[0] == 0:
            return np.full(ids.shape[0], -1, np.int64)
        pos = np.searchsorted(self._sorted, ids)
        pos = np.minimum(pos, self._sorted.shape[0] - 1)
        hit = self._sorted[pos] == ids
        return np.where(hit, self._rows[pos], -1).astype(np.int64)

    @property
    def nbytes(self) -> int:
        return self._sorted.nbytes + self._rows.nbytes


@dataclass(eq=False)
class Segment:
    vectors: np.ndarray  # float16 (capacity, dim); rows [0, n) are in use
    cols: AttributeColumns
    alive: np.ndarray  # bitmap words over the capacity
    n: int
    live: int
    index: VectorIndex | None = None  # None: searched exactly
    attrs: AttributeIndex | None = None
    ids: IdIndex | None = None
    # growing segments only: media id -> row of its live version
    lookup: dict[int, int] | None = None
    seg_id: int = field(default_factory=lambda: next(_ids))
    frozen: bool = False
    _popularity_order: np.ndarray | None = None

    def popularity_order(self) -> np.ndarray:
        """Rows most popular first (a sealed segment's columns do not change: computed once)."""
        if self._popularity_order is None:
            self._popularity_order = np.argsort(-self.cols.popularity[: self.n], kind="stable").astype(np.int64)
        return self._popularity_order

    @property
    def sealed(self) -> bool:
        return self.ids is not None

    @property
    def growing(self) -> bool:
        return self.lookup is not None and not self.frozen

    @property
    def capacity(self) -> int:
        return self.vectors.shape[0]

    @property
    def dead(self) -> int:
        return self.n - self.live

    def rows_of(self, media_ids: np.ndarray) -> np.ndarray:
        """Rows holding ``media_ids`` (live or not for sealed segments), -1 where absent."""
        if self.ids is not None:
            return self.ids.rows_of(media_ids)
        assert self.lookup is not None
        ids = np.asarray(media_ids, np.uint64).tolist()
        return np.fromiter(map(self.lookup.get, ids, itertools.repeat(-1)), np.int64, len(ids))

    def is_alive(self, rows: np.ndarray) -> np.ndarray:
        r = np.asarray(rows, np.int64)
        ok = r >= 0
        out = np.zeros(r.shape[0], bool)
        rr = r[ok]
        out[ok] = ((self.alive[rr >> 6] >> (rr & 63).astype(np.uint64)) & np.uint64(1)) == 1
        return out

    def kill(self, rows: np.ndarray) -> int:
        """Tombstone ``rows`` (live ones); returns how many died. Caller holds the store's write lock."""
        rows = np.asarray(rows, np.int64)
        rows = rows[self.is_alive(rows)]
        if rows.shape[0]:
            bitmaps.clear_rows(self.alive, rows)
            self.live -= int(rows.shape[0])
            if self.lookup is not None:
                for m in self.cols.media_ids[rows].tolist():
                    self.lookup.pop(int(m), None)
        return int(rows.shape[0])

    def live_rows(self) -> np.ndarray:
        from gmco_kernels import bits_to_rows

        return bits_to_rows(self.alive, self.n)

    @property
    def nbytes(self) -> int:
        """Resident bytes of this segment's own structures (the vectors once, columns, index overhead)."""
        index_extra = self.index.nbytes if self.index is not None else 0
        return (self.n * self.vectors.shape[1] * 2 + self.cols.nbytes + self.alive.nbytes + index_extra
                + (self.attrs.nbytes if self.attrs else 0) + (self.ids.nbytes if self.ids else 0))


def new_growing(dim: int, capacity: int) -> Segment:
    return Segment(np.zeros((capacity, dim), np.float16), empty_columns(capacity), bitmaps.empty(capacity), 0, 0,
                   lookup={})
