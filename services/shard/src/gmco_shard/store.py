"""One shard's rows: segments, writes without full rebuilds, filtered search through the planner.

Layout (see ``segment``): sealed segments with an ANN index, frozen segments waiting for theirs, and one
growing segment that takes upserts. A delete or a replacing upsert tombstones the row's live version
wherever it is. Searches run without locks over a snapshot of the segment list; writes and segment swaps
take one lock and are short.

Background maintenance (``maintain``, one task at a time, driven by the servicer's supervisor):

1. **Seal**: the growing segment is frozen when it reaches ``seal_rows`` (new writes go to a fresh one),
   and an index is built over its live rows; the sealed segment replaces the frozen one atomically, with
   the tombstones that arrived during the build carried over. Exactly-scanned rows stay below
   ``2 x seal_rows``, and no write waits for an index build.
2. **Merge** (tiered): sealed segments are grouped by size tier (factor ``merge_factor``); when a tier
   holds ``merge_factor`` segments they are rebuilt as one. A row is re-indexed O(log_factor(N)) times
   over its life, and each merge costs what it merges, not the shard.
3. **Purge**: a segment whose tombstones exceed ``purge_fraction`` of its rows is rebuilt alone from its
   live rows (amortised, at most 1 / purge_fraction rows rebuilt per deleted row).

``compact`` (the Compact RPC) folds everything into one sealed segment. Rows of slots this shard no longer
owns (resharding) are dropped whenever a segment is rebuilt.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from gmco.common.v1 import common_pb2
from gmco_common.slots import NUM_SLOTS, slots_of

from gmco_shard import bitmaps
from gmco_shard.columns import AttributeColumns, copy_rows, empty_columns, read_attributes, write_attributes
from gmco_shard.filters import AttributeIndex, evaluate_filter, is_trivial
from gmco_shard.index.base import FilteringIndex, build_threads, create_index, topk
from gmco_shard.index.exact import exact_search
from gmco_shard.index.params import IndexParams
from gmco_shard.planner import ACORN, EXACT, INDEX, POPULARITY, PREFILTER, SHORT_ANSWERS, Planner
from gmco_shard.segment import IdIndex, Segment, new_growing

log = logging.getLogger(__name__)

SEAL_ROWS = 2_000
MERGE_FACTOR = 4
PURGE_FRACTION = 0.2
_PURGE_MIN_DEAD = 1000
# A replaced segment's index frees what it holds elsewhere (a Milvus collection) this long after the swap,
# when no search that started before the swap can still be reading it.
RETIRE_DELAY_SECONDS = 60.0
# Threads a background index build (seal, merge, purge, compact) may use: all cores but one, so that
# searches keep a core while it runs (the start-up build takes every core).
MAINTENANCE_THREADS = max(1, (os.cpu_count() or 2) - 1)
# A bulk catch-up (an import streaming in through the log) defers index builds: the rows wait in frozen
# segments, searched exactly, and are indexed in one build once the burst is over, instead of a k-means per
# SEAL_ROWS rows while the burst competes with them for the cores (profiled: 80 % of a shard's CPU during a
# 100k-row import was seals). Never beyond this many exactly scanned rows.
DEFER_MAX_ROWS = 200_000


@dataclass(frozen=True)
class SearchResult:
    scores: np.ndarray  # (q, k)
    media_ids: np.ndarray  # (q, k) uint64, 0 where empty
    segment_of: np.ndarray  # (q, k) position in ``segments``, -1 where empty
    rows: np.ndarray  # (q, k) row within that segment, -1 where empty
    segments: tuple[Segment, ...]
    allowed: int
    exact: bool
    paths: tuple[str, ...] = ()

    def item(self, i: int, j: int) -> tuple[Segment, int]:
        return self.segments[int(self.segment_of[i, j])], int(self.rows[i, j])

    def take(self, mine: slice) -> SearchResult:
        return SearchResult(self.scores[mine], self.media_ids[mine], self.segment_of[mine], self.rows[mine],
                            self.segments, self.allowed, self.exact, self.paths)


@dataclass(frozen=True)
class Cut:
    """A consistent view for a snapshot: segments with copies of their mutable parts, and the lsn."""

    segments: list[tuple[Segment, int, np.ndarray]]  # (segment, rows in use, alive bitmap copy)
    applied_lsn: int
    generation: int


class ShardStore:
    def __init__(self, dim: int, backend: str, params: IndexParams, planner: Planner | None = None,
                 owned_slots: Sequence[int] | None = None, seal_rows: int = SEAL_ROWS,
                 merge_factor: int = MERGE_FACTOR, purge_fraction: float = PURGE_FRACTION,
                 maintenance_threads: int = MAINTENANCE_THREADS, defer_max_rows: int = DEFER_MAX_ROWS) -> None:
        self.dim = dim
        self.backend = backend
        self.params = params
        self.planner = planner or Planner()
        self.seal_rows = seal_rows
        self.merge_factor = merge_factor
        self.purge_fraction = purge_fraction
        self.maintenance_threads = maintenance_threads
        self._lock = threading.RLock()
        self._maintenance = threading.Lock()
        self._sealed: tuple[Segment, ...] = ()  # sealed and frozen, oldest first
        self._growing = new_growing(dim, seal_rows)
        self.applied_lsn = 0
        self.generation = 0
        self.compacting = False
        # Until this time.monotonic() (set by replication while it applies a burst), seals and merges wait,
        # as long as the rows waiting stay under defer_max_rows.
        self.defer_builds_until = 0.0
        self.defer_max_rows = defer_max_rows
        # False until the start-up data is in (bulk load, snapshot, or mark_loaded for an empty start).
        self.loaded = False
        # Slots this shard owns (bool over the 4096 slots); rebuilds drop rows of other slots, which is how
        # a shard lets go of slots moved away by resharding. None = keep everything.
        self.owned_slots: np.ndarray | None = None
        if owned_slots is not None:
            self.owned_slots = np.zeros(NUM_SLOTS, bool)
            self.owned_slots[list(owned_slots)] = True

    def mark_loaded(self) -> None:
        self.loaded = True

    def segments(self) -> tuple[Segment, ...]:
        """The current segments, oldest first, the growing one last (a snapshot: the list never mutates)."""
        return (*self._sealed, self._growing)

    # -- building segments -------------------------------------------------------------------------
    def _seal(self, vectors: Any, cols: AttributeColumns, rows: np.ndarray | None, progress: bool) -> Segment:
        """A sealed segment over ``vectors[rows]`` (all rows when None) and their columns (already taken)."""
        n = len(cols)
        index = create_index(self.backend, self.dim, self.params)
        source = _Rows(vectors, rows, self.dim) if rows is not None else vectors
        order = index.layout(source)
        if order is not None and not np.array_equal(order, np.arange(n)):
            rows = order if rows is None else rows[order]
            cols = cols.take(order)
            source = _Rows(vectors, rows, self.dim)
        if isinstance(index, FilteringIndex):
            index.build_with_columns(source, cols, progress=progress)
        else:
            index.build(source, progress=progress)
        table = index.vectors
        if table is None:  # the backend keeps no host copy (GPU, Milvus): the segment keeps the rows
            table = np.ascontiguousarray(vectors[rows] if rows is not None else vectors, dtype=np.float16)
        alive = bitmaps.full(n)
        return Segment(table, cols, alive, n, n, index=index, attrs=AttributeIndex(cols),
                       ids=IdIndex(np.asarray(cols.media_ids)))

    def _owned(self, cols: AttributeColumns, rows: np.ndarray) -> np.ndarray:
        if self.owned_slots is None or rows.shape[0] == 0:
            return rows
        return rows[self.owned_slots[slots_of(cols.media_ids[rows].tolist())]]

    def bulk_load(self, vectors: Any, cols: AttributeColumns, progress: bool = False,
                  rows: np.ndarray | None = None) -> None:
        """Replace everything with one sealed segment over ``vectors`` (or ``vectors[rows]``) and ``cols``
        (the columns of those rows). A repeated id keeps its last row, as a replacing upsert would."""
        ids = np.asarray(cols.media_ids)
        _, last = np.unique(ids[::-1], return_index=True)
        if last.shape[0] != ids.shape[0]:
            keep = np.sort(ids.shape[0] - 1 - last)
            cols = cols.take(keep)
            rows = keep if rows is None else rows[keep]
        segment = self._seal(vectors, cols, rows, progress) if len(cols) else None
        with self._lock:
            self._sealed = (segment,) if segment is not None else ()
            self._growing = new_growing(self.dim, self.seal_rows)
            self.loaded = True

    def install(self, segments: Sequence[Segment], applied_lsn: int, generation: int) -> None:
        """Make ``segments`` (from a snapshot) the store's content; the last one becomes the growing one when
        it has no index."""
        sealed = [s for s in segments if s.sealed]
        growing = [s for s in segments if not s.sealed]
        # Room for the live rows of every unsealed segment together: a snapshot cut while writes go on holds
        # the growing segment and frozen ones still waiting for their index (each up to SEAL_ROWS).
        grow = new_growing(self.dim, max(self.seal_rows, sum(s.live for s in growing)))
        for seg in growing:  # rows of unsealed segments are replayed into one growing segment
            live = seg.live_rows()
            self._append(grow, np.asarray(seg.cols.media_ids)[live], seg.vectors, seg.cols, live)
        with self._lock:
            self._sealed = tuple(sealed)
            self._growing = grow
            self.applied_lsn = applied_lsn
            self.generation = generation
            self.loaded = True

    # -- writes ------------------------------------------------------------------------------------
    def _kill(self, media_ids: np.ndarray) -> int:
        """Tombstone the live version of each id, wherever it is; returns how many died."""
        died = 0
        for seg in self.segments():
            if seg.live == 0:
                continue
            rows = seg.rows_of(media_ids)
            if (rows >= 0).any():
                died += seg.kill(rows[rows >= 0])
        return died

    @staticmethod
    def _append(seg: Segment, media_ids: np.ndarray, vectors: np.ndarray, cols: AttributeColumns,
                src: np.ndarray) -> None:
        assert seg.lookup is not None
        count = src.shape[0]
        start = seg.n
        if count and (np.diff(src) == 1).all():
            src = slice(int(src[0]), int(src[0]) + count)  # a run of rows: copied without a gather
        seg.vectors[start:start + count] = vectors[src]
        copy_rows(seg.cols, start, cols, src)
        bitmaps.set_rows(seg.alive, np.arange(start, start + count))
        seg.lookup.update(zip(np.asarray(media_ids, np.uint64).tolist(), range(start, start + count)))
        seg.live += count
        seg.n = start + count  # last: a concurrent search reads n, then only rows below it

    def _freeze(self) -> None:
        """Move the growing segment to the frozen ones (searched exactly until sealed); start a new one."""
        if self._growing.n == 0:
            return
        self._growing.frozen = True
        self._sealed = (*self._sealed, self._growing)
        self._growing = new_growing(self.dim, self.seal_rows)

    def upsert(self, media_ids: np.ndarray, vectors: np.ndarray,
               attrs: Sequence[common_pb2.MediaAttributes] | AttributeColumns, lsn: int = 0) -> int:
        """Insert or replace; a repeated id within the batch keeps its last version."""
        ids = np.asarray(media_ids, np.uint64)
        if isinstance(attrs, AttributeColumns):
            cols = attrs
        else:
            cols = empty_columns(len(ids))
            for i, (m, a) in enumerate(zip(ids.tolist(), attrs, strict=True)):
                write_attributes(cols, i, m, a)
        _, last = np.unique(ids[::-1], return_index=True)
        keep = np.sort(ids.shape[0] - 1 - last)
        with self._lock:
            self._kill(ids[keep])
            start = 0
            while start < keep.shape[0]:
                if self._growing.n == self._growing.capacity:
                    self._freeze()
                room = self._growing.capacity - self._growing.n
                part = keep[start:start + room]
                self._append(self._growing, ids[part], vectors, cols, part)
                start += part.shape[0]
            self.applied_lsn = max(self.applied_lsn, lsn)
        return int(ids.shape[0])

    def delete(self, media_ids: np.ndarray, lsn: int = 0) -> int:
        with self._lock:
            died = self._kill(np.unique(np.asarray(media_ids, np.uint64)))
            self.applied_lsn = max(self.applied_lsn, lsn)
        return died

    def mark_applied(self, lsn: int) -> None:
        with self._lock:
            self.applied_lsn = max(self.applied_lsn, lsn)

    # -- reads -------------------------------------------------------------------------------------
    def locate(self, media_ids: Sequence[int]) -> list[tuple[Segment, int] | None]:
        """(segment, row) of each id's live version, or None."""
        ids = np.asarray(media_ids, np.uint64)
        found: list[tuple[Segment, int] | None] = [None] * ids.shape[0]
        for seg in reversed(self.segments()):  # newest first: a live version is there if anywhere
            rows = seg.rows_of(ids)
            alive = seg.is_alive(rows)
            for i in np.flatnonzero(alive).tolist():
                if found[i] is None:
                    found[i] = (seg, int(rows[i]))
        return found

    def get(self, media_ids: Sequence[int]) -> list[tuple[int, np.ndarray, common_pb2.MediaAttributes] | None]:
        return [None if loc is None else (int(m), loc[0].vectors[loc[1]].copy(), read_attributes(loc[0].cols, loc[1]))
                for m, loc in zip(media_ids, self.locate(media_ids), strict=True)]

    def _allow(self, seg: Segment, n: int, flt: common_pb2.Filter | None) -> np.ndarray | None:
        """The rows of ``seg`` a search may return (live, passing ``flt``) as a bitmap; None = all n rows."""
        alive = seg.alive[: bitmaps.words_for(n)]
        if is_trivial(flt):
            return None if seg.live == n else alive.copy()
        assert flt is not None
        if seg.attrs is not None:
            words = seg.attrs.evaluate(flt)
            if flt.excluded_media_ids:
                rows = seg.rows_of(np.asarray(flt.excluded_media_ids, np.uint64))
                bitmaps.clear_rows(words, rows[rows >= 0])
        else:
            words = bitmaps.from_bools(evaluate_filter(seg.cols.head(n), flt))
        words &= alive
        return words

    def search(self, queries: np.ndarray, k: int, flt: common_pb2.Filter | None = None, ef: int = 0,
               force_exact: bool = False, row_filters: Sequence[common_pb2.Filter | None] | None = None,
               popularity: bool = False) -> SearchResult:
        """Filtered top-k over every segment. Thread-safe; runs without the write lock.

        ``row_filters`` gives each query row its own filter (rows with equal filters search together);
        ``popularity`` orders what passes the filter by the popularity column instead of similarity (the
        query vectors are then only counted, not read)."""
        segments = self.segments()
        q = np.ascontiguousarray(queries, dtype=np.float32)
        if row_filters is None:
            return self._search_in(segments, q, k, flt, ef, force_exact, popularity)
        groups: dict[bytes, list[int]] = {}
        for i, f in enumerate(row_filters):
            groups.setdefault(b"" if is_trivial(f) else f.SerializeToString(deterministic=True), []).append(i)
        if len(groups) == 1:
            return self._search_in(segments, q, k, row_filters[0], ef, force_exact, popularity)
        nq = q.shape[0]
        scores = np.full((nq, k), -np.inf, np.float32)
        media_ids = np.zeros((nq, k), np.uint64)
        seg_of = np.full((nq, k), -1, np.int64)
        rows = np.full((nq, k), -1, np.int64)
        allowed, exact, paths = 0, True, []
        for members in groups.values():
            idx = np.asarray(members)
            part = self._search_in(segments, q[idx], k, row_filters[members[0]], ef, force_exact, popularity)
            scores[idx], media_ids[idx], seg_of[idx], rows[idx] = part.scores, part.media_ids, part.segment_of, \
                part.rows
            allowed = max(allowed, part.allowed)
            exact &= part.exact
            paths.extend(part.paths)
        return SearchResult(scores, media_ids, seg_of, rows, segments, allowed, exact, tuple(paths))

    def _search_in(self, segments: tuple[Segment, ...], q: np.ndarray, k: int, flt: common_pb2.Filter | None,
                   ef: int, force_exact: bool, popularity: bool) -> SearchResult:
        metric = self.params.metric
        nq = q.shape[0]
        graph_ef = ef or self.params.hnsw.ef_search  # the beam of a graph search; other backends read ef as given
        part_s, part_r, part_seg = [], [], []
        allowed_total = 0
        paths = []
        for si, seg in enumerate(segments):
            n = seg.n
            if n == 0 or seg.live == 0:
                continue
            allow = self._allow(seg, n, flt)
            allowed = n if allow is None else bitmaps.count(allow)
            allowed_total += allowed
            if allowed == 0:
                continue
            if popularity:
                s, r = _most_popular(seg, n, allow, k)
                s, r = np.broadcast_to(s, (nq, k)), np.broadcast_to(r, (nq, k))
                paths.append(POPULARITY)
                self.planner.count(POPULARITY)
                part_s.append(s)
                part_r.append(r)
                part_seg.append(np.full(r.shape, si, np.int64))
                continue
            index = seg.index
            has_index = index is not None and not index.exact and not force_exact
            path = self.planner.choose(n, allowed, has_index, has_index and index.graph is not None,
                                       filtering=isinstance(index, FilteringIndex))
            self.planner.count(path)
            paths.append(path)
            vectors = seg.vectors[:n]
            if path == EXACT:
                s, r = self._exact(index, vectors, q, k, allow, metric)
            elif path == INDEX:
                s, r = index.search(q, k, allow, ef)
            elif path == PREFILTER:
                # a graph's beam is widened by the filter; IVF keeps probing lists by itself
                widened = self.planner.widen(graph_ef, n, allowed) if index.graph is not None else ef
                s, r = index.search(q, k, allow, widened)
            elif path == ACORN:
                graph = index.graph
                s = np.empty((nq, k), np.float32)
                r = np.empty((nq, k), np.int64)
                for i in range(nq):
                    s[i], r[i], _ = graph.search(q[i], vectors, k, graph_ef, allow, metric)
            else:  # NATIVE: the backend evaluates the Filter; it is told which rows are dead
                dead = np.flatnonzero(~bitmaps.to_bools(seg.alive, n)) if seg.dead else np.empty(0, np.int64)
                s, r = index.search_filter(q, k, flt, dead, ef)
            if path != EXACT:
                s, r = self._fill_short(s, r, min(k, allowed), path, index, vectors, q, allow, metric)
            part_s.append(s)
            part_r.append(r)
            part_seg.append(np.full(r.shape, si, np.int64))
        if not part_s:
            empty = np.full((nq, k), -1, np.int64)
            return SearchResult(np.full((nq, k), -np.inf, np.float32), np.zeros((nq, k), np.uint64), empty,
                                empty.copy(), segments, 0, True, ())
        scores = np.concatenate(part_s, 1)
        rows = np.concatenate(part_r, 1)
        seg_of = np.concatenate(part_seg, 1)
        if len(part_s) > 1:
            order = np.arange(scores.shape[1])
            s, pos = topk(scores, np.broadcast_to(order, scores.shape).astype(np.int64), k)
            valid = pos >= 0
            p = np.maximum(pos, 0)
            rows = np.where(valid, np.take_along_axis(rows, p, 1), -1)
            seg_of = np.where(valid, np.take_along_axis(seg_of, p, 1), -1)
            scores = s
        else:
            seg_of = np.where(rows >= 0, seg_of, -1)
        media_ids = np.zeros(rows.shape, np.uint64)
        for si in np.unique(seg_of[seg_of >= 0]).tolist():
            mask = seg_of == si
            media_ids[mask] = segments[si].cols.media_ids[rows[mask]]
        return SearchResult(np.ascontiguousarray(scores, dtype=np.float32), media_ids, seg_of, np.ascontiguousarray(rows),
                            segments, allowed_total, all(p == EXACT for p in paths), tuple(paths))

    @staticmethod
    def _exact(index: Any, vectors: np.ndarray, q: np.ndarray, k: int, allow: np.ndarray | None,
               metric: str) -> tuple[np.ndarray, np.ndarray]:
        """The exact top-k of the allowed rows: on the device where an index keeps the rows there."""
        if index is not None and not index.exact and hasattr(index, "exact_search"):
            return index.exact_search(q, k, allow)
        return exact_search(vectors, q, k, metric, allow=allow)

    def _fill_short(self, scores: np.ndarray, rows: np.ndarray, want: int, path: str, index: Any,
                    vectors: np.ndarray, q: np.ndarray, allow: np.ndarray | None,
                    metric: str) -> tuple[np.ndarray, np.ndarray]:
        """Re-answer exactly the queries an ANN path answered with fewer than ``want`` (= min(k, allowed
        rows)) hits. A graph search under a tight filter can run out of allowed neighbours (ACORN, faiss's
        pre-filter), and Milvus 2.3's HNSW now and then returns nothing at all for one query of a filtered
        batch (milvus-io/milvus#28603; seen in this project's CI). The exact scan reads only the allowed
        rows, so it is cheap where graphs come back short: under tight filters."""
        short = np.flatnonzero((rows >= 0).sum(1) < want)
        if short.size == 0:
            return scores, rows
        SHORT_ANSWERS.labels(path).inc(int(short.size))
        s, r = self._exact(index, vectors, q[short], rows.shape[1], allow, metric)
        scores, rows = np.array(scores, np.float32), np.array(rows, np.int64)
        scores[short], rows[short] = s, r
        return scores, rows

    # -- maintenance -------------------------------------------------------------------------------
    def _rebuild(self, sources: Sequence[Segment], progress: bool = False) -> Segment | None:
        """One sealed segment over the live, owned rows of ``sources`` (outside the lock: they keep serving)."""
        parts = []
        for seg in sources:
            live = self._owned(seg.cols, seg.live_rows())
            parts.append((seg, live))
        total = sum(p[1].shape[0] for p in parts)
        if total == 0:
            return None
        vectors = np.empty((total, self.dim), np.float16)
        cols = empty_columns(total)
        at = 0
        for seg, live in parts:
            vectors[at:at + live.shape[0]] = seg.vectors[live]
            copy_rows(cols, at, seg.cols, live)
            at += live.shape[0]
        new = self._seal(vectors, cols, None, progress)
        new._sources = parts  # type: ignore[attr-defined]  # (source, rows) for the tombstone carry-over
        return new

    def _swap(self, old: Sequence[Segment], new: Segment | None) -> None:
        """Under the lock: replace ``old`` with ``new``, carrying over rows that died during the rebuild."""
        with self._lock:
            if new is not None:
                # Rows that died in a source since the rebuild read it die in the new segment too, found by
                # media id: the index may have laid the rows out in another order (IVF groups them by list).
                died = [seg.cols.media_ids[live[~seg.is_alive(live)]]
                        for seg, live in new._sources]  # type: ignore[attr-defined]
                del new._sources  # type: ignore[attr-defined]
                dead = np.concatenate(died) if died else np.empty(0, np.uint64)
                if dead.shape[0]:
                    new.kill(new.rows_of(dead))
            old_ids = {s.seg_id for s in old}
            kept = [s for s in self._sealed if s.seg_id not in old_ids]
            # the new segment takes the place of the oldest it replaces, so segment age order holds
            first = min((i for i, s in enumerate(self._sealed) if s.seg_id in old_ids), default=len(kept))
            if new is not None:
                kept.insert(min(first, len(kept)), new)
            self._sealed = tuple(kept)
            self.generation += 1
        for seg in old:
            if seg.index is not None:
                timer = threading.Timer(RETIRE_DELAY_SECONDS, seg.index.retire)
                timer.daemon = True
                timer.start()

    def _plan(self) -> tuple[str, list[Segment]] | None:
        """The next maintenance step, or None when there is nothing to do."""
        frozen = [s for s in self._sealed if s.frozen]
        if (time.monotonic() < self.defer_builds_until
                and sum(s.n for s in frozen) + self._growing.n < self.defer_max_rows):
            return None
        if frozen:  # every frozen segment in one build (several after a deferred burst)
            return "seal", frozen
        if self._growing.n >= self.seal_rows:
            return "seal", []
        sealed = [s for s in self._sealed if not s.frozen]
        for seg in sealed:
            if seg.dead >= max(_PURGE_MIN_DEAD, self.purge_fraction * seg.n) or (seg.live == 0 and seg.n):
                return "purge", [seg]
        tiers: dict[int, list[Segment]] = {}
        for seg in sealed:
            tier = int(np.log(max(seg.live, 1) / self.seal_rows) / np.log(self.merge_factor)) if seg.live > \
                self.seal_rows else 0
            tiers.setdefault(tier, []).append(seg)
        for tier in sorted(tiers):
            if len(tiers[tier]) >= self.merge_factor:
                return "merge", tiers[tier][: self.merge_factor]
        return None

    def needs_maintenance(self) -> bool:
        return self._plan() is not None

    def maintain(self, progress: bool = False) -> str | None:
        """Run one maintenance step (seal, purge or merge); returns what it did, None when idle."""
        with self._maintenance:
            with self._lock:
                step = self._plan()
                if step is None:
                    return None
                what, sources = step
                if what == "seal" and not sources:
                    self._freeze()
                    sources = [self._sealed[-1]]
            start = time.perf_counter()
            with build_threads(self.maintenance_threads):
                new = self._rebuild(sources, progress)
            self._swap(sources, new)
            log.info("%s: %d segment(s), %d rows -> %d rows in %.1f s; %d segments now", what, len(sources),
                     sum(s.n for s in sources), 0 if new is None else new.n, time.perf_counter() - start,
                     len(self._sealed) + 1)
            return what

    def compact(self, progress: bool = False) -> Segment | None:
        """Fold every segment (the growing one too) into one sealed segment; swap it in atomically."""
        with self._maintenance:
            self.compacting = True
            try:
                with self._lock:
                    self._freeze()
                    sources = list(self._sealed)
                with build_threads(self.maintenance_threads):
                    new = self._rebuild(sources, progress)
                self._swap(sources, new)
                log.info("compaction: %d rows in one segment, generation %d", 0 if new is None else new.n,
                         self.generation)
                return new
            finally:
                self.compacting = False

    # -- snapshots ---------------------------------------------------------------------------------
    def cut(self) -> Cut:
        """A consistent view: each segment with its row count and a copy of its tombstones, and the lsn."""
        with self._lock:
            segs = [(s, s.n, s.alive[: bitmaps.words_for(s.n)].copy()) for s in self.segments() if s.n]
            return Cut(segs, self.applied_lsn, self.generation)

    # -- stats -------------------------------------------------------------------------------------
    def stats(self) -> dict[str, Any]:
        segs = self.segments()
        sealed = [s for s in segs if s.sealed]
        unsealed = [s for s in segs if not s.sealed]
        return {
            "item_count": sum(s.live for s in segs),
            "sealed_count": sum(s.n for s in sealed),
            "growing_count": sum(s.n for s in unsealed),
            "tombstone_count": sum(s.dead for s in segs),
            "index_bytes": sum(s.index.nbytes for s in sealed if s.index is not None),
            "vector_bytes": sum(s.n for s in segs) * self.dim * 2,
            "index_generation": self.generation,
            "segment_count": len(segs),
        }


def _most_popular(seg: Segment, n: int, allow: np.ndarray | None, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(popularity scores (k,), rows (k,)) of the k most popular allowed rows of ``seg``: a sealed segment
    walks its rows in popularity order (computed once) in chunks until k pass, so the cost is ~k / allowed
    fraction; the growing segment sorts its few rows."""
    popularity = seg.cols.popularity[:n]
    order = seg.popularity_order() if seg.sealed else np.argsort(-popularity, kind="stable")
    found: list[np.ndarray] = []
    need, chunk, start = k, max(4 * k, 1024), 0
    while need > 0 and start < order.shape[0]:
        part = order[start:start + chunk]
        if allow is not None:
            part = part[((allow[part >> 6] >> (part & 63).astype(np.uint64)) & np.uint64(1)).astype(bool)]
        found.append(part[:need])
        need -= min(need, part.shape[0])
        start += chunk
        chunk *= 2
    rows = np.concatenate(found) if found else np.empty(0, np.int64)
    scores = np.full(k, -np.inf, np.float32)
    out = np.full(k, -1, np.int64)
    scores[: rows.shape[0]] = popularity[rows]
    out[: rows.shape[0]] = rows
    return scores, out


class _Rows:
    """``vectors[rows]`` read lazily in chunks (an index build reads a memory-mapped catalogue this way,
    without first copying the shard's rows)."""

    def __init__(self, vectors: Any, rows: np.ndarray, dim: int) -> None:
        self._vectors = vectors
        self._rows = rows
        self.shape = (rows.shape[0], dim)
        self.dtype = np.dtype(np.float16)

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, item: slice) -> np.ndarray:
        return np.asarray(self._vectors[self._rows[item]])

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        out = np.asarray(self._vectors[self._rows])
        return out if dtype is None else out.astype(dtype)
