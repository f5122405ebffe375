"""The compiled ``Filter``: its semantics over attribute columns, and the attribute index that evaluates
it in O(rows / 64) word operations on a sealed segment instead of one comparison per row per clause.

Semantics (see gmco.common.v1.Filter): an item passes when every populated clause holds: any allowed
genre, no blocked genre, rating <= max_rating, region and format bit intersections, release-year range,
and not excluded by id.

- :func:`evaluate_filter` is the reference: numpy over the columns, a bool mask. The growing segment uses
  it (it is small), and the attribute index is tested against it.
- :class:`AttributeIndex` is built once per sealed segment: a row bitmap per genre code, per rating level,
  per region bit and per format bit, and the rows sorted by release year. A filter is then ORs and ANDs of
  a few bitmaps; the per-user part (``excluded_media_ids``) clears the few rows it names. Results are
  cached per filter (less its excluded ids): contexts are few, so most searches reuse a bitmap.
"""

from __future__ import annotations

import threading

import numpy as np
from gmco.common.v1 import common_pb2
from gmco_common.lru import TtlLru

from gmco_shard import bitmaps
from gmco_shard.columns import AttributeColumns


def is_trivial(f: common_pb2.Filter | None) -> bool:
    return f is None or f.ByteSize() == 0


def evaluate_filter(cols: AttributeColumns, f: common_pb2.Filter | None) -> np.ndarray:
    """Boolean mask over the rows of ``cols``: True where the item passes ``f``."""
    n = len(cols)
    mask = np.ones(n, dtype=bool)
    if is_trivial(f):
        return mask
    assert f is not None
    if f.allowed_genre_ids:
        mask &= np.isin(cols.genre_ids, np.asarray(f.allowed_genre_ids, np.int64)).any(axis=1)
    if f.blocked_genre_ids:
        mask &= ~np.isin(cols.genre_ids, np.asarray(f.blocked_genre_ids, np.int64)).any(axis=1)
    if f.HasField("max_rating"):
        mask &= cols.rating <= f.max_rating
    if f.region_mask:
        mask &= (cols.region_mask & np.uint64(f.region_mask)) != 0
    if f.format_mask:
        mask &= (cols.format_mask & np.uint64(f.format_mask)) != 0
    if f.min_release_year:
        mask &= cols.release_year >= f.min_release_year
    if f.max_release_year:
        mask &= cols.release_year <= f.max_release_year
    if f.excluded_media_ids:
        mask &= ~np.isin(cols.media_ids, np.asarray(f.excluded_media_ids, np.uint64))
    return mask


def shared_key(f: common_pb2.Filter) -> bytes:
    """The filter less its per-user part (excluded ids): the key under which compiled bitmaps are shared."""
    if not f.excluded_media_ids:
        return f.SerializeToString(deterministic=True)
    g = common_pb2.Filter()
    g.CopyFrom(f)
    del g.excluded_media_ids[:]
    return g.SerializeToString(deterministic=True)


def _bit_postings(masks: np.ndarray, n: int) -> dict[int, np.ndarray]:
    """For each bit b set in any of the uint64 ``masks``: the bitmap of rows whose mask has bit b."""
    present = int(np.bitwise_or.reduce(masks)) if masks.shape[0] else 0
    out = {}
    for b in range(64):
        if present >> b & 1:
            out[b] = bitmaps.from_bools((masks >> np.uint64(b)) & np.uint64(1) != 0)
    return out


class AttributeIndex:
    """Bitmap postings over one sealed segment's (immutable) columns."""

    def __init__(self, cols: AttributeColumns, cache_entries: int = 64) -> None:
        n = self.n = len(cols)
        genres = np.asarray(cols.genre_ids)
        flat = genres.reshape(-1)
        rows = np.repeat(np.arange(n, dtype=np.int64), genres.shape[1])
        keep = flat >= 0
        flat, rows = flat[keep], rows[keep]
        order = np.argsort(flat, kind="stable")
        flat, rows = flat[order], rows[order]
        codes, starts = np.unique(flat, return_index=True)
        ends = np.append(starts[1:], flat.shape[0]) if codes.shape[0] else starts
        self._genre = {int(g): bitmaps.from_rows(rows[s:e], n) for g, s, e in zip(codes, starts, ends, strict=True)}
        rating = np.asarray(cols.rating)
        self._rating_levels = np.unique(rating)
        # _rating_le[i]: rows whose rating <= _rating_levels[i]
        self._rating_le = []
        acc = bitmaps.empty(n)
        for level in self._rating_levels:
            acc = acc | bitmaps.from_bools(rating == level)
            self._rating_le.append(acc.copy())
        self._region = _bit_postings(np.asarray(cols.region_mask), n)
        self._format = _bit_postings(np.asarray(cols.format_mask), n)
        years = np.asarray(cols.release_year)
        self._year_order = np.argsort(years, kind="stable").astype(np.int64)
        self._years_sorted = years[self._year_order]
        self._cache: TtlLru[bytes, np.ndarray] = TtlLru(cache_entries, ttl=None)
        self._lock = threading.Lock()
        self.nbytes = (sum(b.nbytes for b in self._genre.values()) + sum(b.nbytes for b in self._rating_le)
                       + sum(b.nbytes for b in self._region.values()) + sum(b.nbytes for b in self._format.values())
                       + self._year_order.nbytes + self._years_sorted.nbytes)

    def _any_of(self, postings: dict[int, np.ndarray], keys) -> np.ndarray:
        out = bitmaps.empty(self.n)
        for key in keys:
            bm = postings.get(int(key))
            if bm is not None:
                out |= bm
        return out

    def _shared(self, f: common_pb2.Filter) -> np.ndarray:
        n = self.n
        out = bitmaps.full(n)
        if f.allowed_genre_ids:
            out &= self._any_of(self._genre, f.allowed_genre_ids)
        if f.blocked_genre_ids:
            out &= ~self._any_of(self._genre, f.blocked_genre_ids)
        if f.HasField("max_rating"):
            i = int(np.searchsorted(self._rating_levels, f.max_rating, side="right")) - 1
            out &= self._rating_le[i] if i >= 0 else bitmaps.empty(n)
        if f.region_mask:
            out &= self._any_of(self._region, (b for b in range(64) if f.region_mask >> b & 1))
        if f.format_mask:
            out &= self._any_of(self._format, (b for b in range(64) if f.format_mask >> b & 1))
        if f.min_release_year or f.max_release_year:
            lo = int(np.searchsorted(self._years_sorted, f.min_release_year, side="left")) if f.min_release_year else 0
            hi = (int(np.searchsorted(self._years_sorted, f.max_release_year, side="right")) if f.max_release_year
                  else n)
            out &= bitmaps.from_rows(self._year_order[lo:hi], n)
        if n % 64:
            out[-1] &= np.uint64((1 << (n % 64)) - 1)
        return out

    def evaluate(self, f: common_pb2.Filter) -> np.ndarray:
        """The bitmap of rows whose attributes pass ``f`` (a fresh array the caller may modify).

        ``excluded_media_ids`` is not applied here: it is a lookup by id, which the segment's sorted id
        index answers in O(log n) per id (``ShardStore._allow`` clears those rows); a scan of the id column
        here cost 1M comparisons for a user's 20 seen items."""
        key = shared_key(f)
        with self._lock:
            cached = self._cache.get(key)
        if cached is None:
            cached = self._shared(f)
            with self._lock:
                self._cache.put(key, cached)
        return cached.copy()
