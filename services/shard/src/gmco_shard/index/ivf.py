"""IVF on CPU over the segment's own FP16 rows: k-means lists, rows stored grouped by list, scanned by the
C kernel.

The segment keeps its rows in list order (the store permutes rows and columns by :meth:`IvfIndex.layout`
before the build), so list l is the contiguous block ``rows[offsets[l]:offsets[l + 1]]`` of the FP16 table
the index hands out as ``vectors``: one copy of the vectors, read sequentially. A search scores the query
against the centroids (BLAS), then scans the best ``nprobe`` lists.

Filters cost less, not more: the kernel checks each row's bit before touching its vector. A filter that
allows a fraction s of the rows makes the nearest allowed rows lie further out, and how far depends on the
query (a filter blocking the query's own genre leaves none of its neighbourhood). So an inner-product
filtered search decides from the scores it holds when to stop, not from a row quota:

- Each list keeps its **spread**, the root-mean-square distance of its rows from its centroid. For a
  query q, a row of list l scores q.c_l plus the residual's projection on q, whose scale is about
  spread_l * |q| / sqrt(dim); the list's **bound** is ``q.c_l + BOUND_SIGMAS * spread_l * |q| / sqrt(dim)``.
- Lists are probed in the order of their bounds, at least ``nprobe`` of them, and the scan stops at the
  first list whose bound is below the k-th best allowed score held: no later list is expected to hold a
  better row. It scores at most the allowed rows, as the exact path would.

On the 1M x 1024 clustered catalogue (100 queries, a simulation of the rule over every row's exact score),
the quota rule this replaced scored 15,700 rows at 8.8 % allowed with the query's genre blocked (recall@10
0.973) and 31,400 at 25.7 % (0.958); bounds at 3.25 sigmas score 7,000 (0.989) and 14,500 (0.975). See
docs/benchmarks.md.

An L2 segment keeps the quota rule: ``nprobe * (1 + log2(1 / s))`` lists, then on until it has scored as
many allowed rows as those lists would hold for a filter unrelated to the query (at least
``k * MIN_ALLOWED_PER_K``), and ``SPARSE_BOOST`` times as many when the first lists are sparse. A filter
passing ``NEAR_ALL_FRACTION`` or more of the rows (tombstones only) keeps the unfiltered budget on either
metric; a query that then holds fewer than k rows (the few rows filtered out were its own lists) is searched
again as a filtered one.

Building trains k-means on a sample (faiss, spherical for inner product) and assigns every row: a 1M x 1024
segment builds in well under a minute on 2 cores, so sealing and merging segments is cheap.
"""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path

import gmco_kernels
import numpy as np

logging.getLogger("faiss.loader").setLevel(logging.WARNING)
import faiss

from gmco_shard import bitmaps
from gmco_shard.index.base import VectorIndex

log = logging.getLogger(__name__)

_CENTROIDS = "ivf_centroids.npy"
_OFFSETS = "ivf_offsets.npy"
_SPREAD = "ivf_spread.npy"
_CHUNK = 50_000
_TRAIN_PER_LIST = 64  # k-means sample: rows per list (capped at MAX_TRAIN)
MAX_TRAIN = 100_000
MIN_ALLOWED_PER_K = 30
MAX_VISIT_FRACTION = 0.5
# When the first lists hold fewer allowed rows than SPARSE_TRIGGER x the filter's overall density (the filter
# excludes the query's neighbourhood), score SPARSE_BOOST times as many allowed rows before stopping. Measured
# on the 1M x 1024 clustered catalogue with the query's own genre blocked (80 queries, nprobe 8): no boost
# gave recall@10 0.845 (10% allowed) and 0.864 (30%); 4x at trigger 0.5 0.920 and 0.931; 6x at 0.8 0.949 and
# 0.944 (5.1 and 6.6 ms a query); 8x at 0.5 0.965 and 0.949 (6.5 and 8.0 ms). See docs/benchmarks.md.
SPARSE_BOOST = 6
SPARSE_TRIGGER = 0.8
# A filter that passes at least this fraction of the rows (tombstones alone, as a shard taking writes has)
# keeps the unfiltered budget: the dead rows are skipped, and the lists are not widened. Widening by
# ceil(nprobe * (1 + log2(1 / s))) probed a ninth list for 0.2% tombstones, 12% more rows for nothing.
NEAR_ALL_FRACTION = 0.95
# An inner-product filtered search stops at the first list whose bound (centroid score + this many
# residual sigmas) is below the k-th score held. Simulated on the 1M x 1024 catalogue with the query's genre
# blocked, at 25.7 % allowed: 3 sigmas gave recall@10 0.961 (10,900 rows scored), 3.25 gave 0.975 (14,500),
# 3.5 gave 0.988 (18,200); the quota rule it replaced, 0.958 (31,400).
BOUND_SIGMAS = 3.25


def list_count(rows: int, factor: float) -> int:
    """Lists for a segment of ``rows``: factor * sqrt(rows), at least 1, and at most rows / 64."""
    if rows < 256:
        return 1
    return max(1, min(int(factor * math.sqrt(rows)), rows // 64))


class IvfIndex(VectorIndex):
    name = "ivf"

    def __init__(self, dim, params) -> None:
        super().__init__(dim, params)
        self._centroids = np.zeros((1, dim), np.float32)
        self._offsets = np.zeros(2, np.int64)
        self._spread = np.zeros(1, np.float32)
        self._labels: np.ndarray | None = None
        self._vectors = np.empty((0, dim), np.float16)

    # -- building --------------------------------------------------------------------------------
    def _train(self, vectors) -> None:
        n = vectors.shape[0]
        nlist = list_count(n, self.params.ivf.lists_factor)
        if nlist == 1:
            sample = np.asarray(vectors[: min(n, MAX_TRAIN)], np.float32)
            self._centroids = sample.mean(0, keepdims=True).astype(np.float32)
            return
        m = min(n, max(nlist * _TRAIN_PER_LIST, min(n, 20_000)), MAX_TRAIN)
        pick = np.sort(np.random.default_rng(self.params.ivf.seed).choice(n, m, replace=False))
        sample = np.asarray(vectors[pick], np.float32)
        km = faiss.Kmeans(self.dim, nlist, niter=self.params.ivf.train_iterations, seed=self.params.ivf.seed,
                          spherical=self.params.metric == "ip", verbose=False, min_points_per_centroid=1,
                          max_points_per_centroid=max(1, m // nlist + 1))
        km.train(sample)
        self._centroids = np.ascontiguousarray(km.centroids, dtype=np.float32)

    def _assign(self, vectors) -> np.ndarray:
        n = vectors.shape[0]
        labels = np.empty(n, np.int64)
        if self._centroids.shape[0] == 1:
            labels[:] = 0
            return labels
        metric = faiss.METRIC_INNER_PRODUCT if self.params.metric == "ip" else faiss.METRIC_L2
        coarse = faiss.IndexFlat(self.dim, metric)
        coarse.add(self._centroids)
        for s in range(0, n, _CHUNK):
            _, lab = coarse.search(np.ascontiguousarray(vectors[s:s + _CHUNK], dtype=np.float32), 1)
            labels[s:s + lab.shape[0]] = lab[:, 0]
        return labels

    def layout(self, vectors) -> np.ndarray:
        """Train and assign; the row order the segment must adopt (rows grouped by list) before ``build``."""
        start = time.perf_counter()
        self._train(vectors)
        labels = self._assign(vectors)
        order = np.argsort(labels, kind="stable")
        self._labels = labels[order]
        if vectors.shape[0] >= 100_000:
            log.info("ivf: %d lists over %d rows trained and assigned in %.0f s", self._centroids.shape[0],
                     vectors.shape[0], time.perf_counter() - start)
        return order

    def build(self, vectors, progress: bool = False) -> None:
        """Index ``vectors`` (already in :meth:`layout` order when it was called; else laid out here and kept
        in the given order only when it already is list order)."""
        n = vectors.shape[0]
        if self._labels is None or self._labels.shape[0] != n:
            order = self.layout(vectors)
            if not np.array_equal(order, np.arange(n)):
                raise ValueError("IvfIndex.build needs its rows in layout() order; call layout first")
        labels = self._labels
        assert labels is not None
        self._labels = None
        counts = np.bincount(labels, minlength=self._centroids.shape[0])
        self._offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        table = np.empty((n, self.dim), np.float16)
        from tqdm import tqdm

        for s in tqdm(range(0, n, _CHUNK), desc="ivf rows", unit="chunk", disable=not progress or n < 10 * _CHUNK):
            table[s:s + _CHUNK] = vectors[s:s + _CHUNK]
        self._vectors = table
        self._spread = self._spreads(table)
        self.count = n

    def _spreads(self, table: np.ndarray) -> np.ndarray:
        """Each list's root-mean-square distance of its rows from its centroid (0 for an empty list)."""
        counts = np.diff(self._offsets)
        labels = np.repeat(np.arange(self.lists), counts)
        total = np.zeros(self.lists, np.float64)
        for s in range(0, table.shape[0], _CHUNK):
            residual = np.asarray(table[s:s + _CHUNK], np.float32) - self._centroids[labels[s:s + _CHUNK]]
            total += np.bincount(labels[s:s + _CHUNK], np.einsum("ij,ij->i", residual, residual),
                                 minlength=self.lists)
        return np.sqrt(total / np.maximum(counts, 1)).astype(np.float32)

    @property
    def vectors(self) -> np.ndarray | None:
        return self._vectors

    @property
    def lists(self) -> int:
        return int(self._centroids.shape[0])

    # -- searching -------------------------------------------------------------------------------
    def nprobe(self, ef: int) -> int:
        """Lists to probe: the request's breadth (``ef``) or the default, scaled to this segment's lists."""
        want = ef or self.params.ivf.nprobe
        return max(1, min(self.lists, want))

    def _centroid_scores(self, q: np.ndarray) -> np.ndarray:
        scores = q @ self._centroids.T
        if self.params.metric == "l2":
            scores = 2 * scores - (self._centroids * self._centroids).sum(1)[None, :]
        return scores

    def bounds(self, q: np.ndarray) -> np.ndarray:
        """Each list's bound for each query (inner product): its centroid's score plus ``BOUND_SIGMAS``
        times the spread of its rows' scores around it."""
        sigma = np.linalg.norm(q, axis=1, keepdims=True) * self._spread[None, :] / math.sqrt(self.dim)
        return (self._centroid_scores(q) + BOUND_SIGMAS * sigma).astype(np.float32)

    def _orders(self, q: np.ndarray, probe: int) -> np.ndarray:
        scores = self._centroid_scores(q)
        if probe >= self.lists:
            return np.argsort(-scores, axis=1)  # every list in order (a filtered search may need them all)
        # The best `probe` lists in order. One query (most searches) takes plain indexing: the along-axis
        # form, and sorting the lists that are not probed, were a fifth of a search over a few segments.
        if scores.shape[0] == 1:
            s = -scores[0]
            top = np.argpartition(s, probe - 1)[:probe]
            return top[np.argsort(s[top], kind="stable")][None, :]
        top = np.argpartition(-scores, probe - 1, axis=1)[:, :probe]
        return np.take_along_axis(top, np.argsort(-np.take_along_axis(scores, top, 1), 1, kind="stable"), 1)

    def filtered_budget(self, probe: int, k: int, allowed: int) -> tuple[int, int]:
        """(lists to probe at least, allowed rows to score at least) for a filter allowing ``allowed`` rows."""
        fraction = max(allowed, 1) / max(self.count, 1)
        if fraction >= NEAR_ALL_FRACTION:
            return probe, 0
        lists = min(self.lists, math.ceil(probe * (1 + math.log2(1 / fraction))))
        rows_per_list = self.count / max(self.lists, 1)
        return lists, max(k * MIN_ALLOWED_PER_K, int(fraction * rows_per_list * lists))

    def search(self, queries, k, allow=None, ef=0):
        q = np.ascontiguousarray(queries, dtype=np.float32)
        probe = self.nprobe(ef)
        allowed = self.count if allow is None else bitmaps.count(allow)
        if allowed >= NEAR_ALL_FRACTION * self.count:
            scores, rows = self._search_probed(q, k, probe, allow)
            # A filter passing nearly every row can still be the one that removes the query's own lists
            # (one genre blocked): such a query found fewer than k rows, and is searched again as filtered.
            short = np.flatnonzero(rows[:, -1] < 0) if allow is not None and allowed >= k else ()
            for i in short:
                scores[i], rows[i] = self._search_filtered(q[i:i + 1], k, probe, allow, allowed)
            return scores, rows
        return self._search_filtered(q, k, probe, allow, allowed)

    def _search_probed(self, q: np.ndarray, k: int, probe: int, allow) -> tuple[np.ndarray, np.ndarray]:
        """The unfiltered budget: the ``probe`` best lists by centroid, skipping rows ``allow`` clears."""
        orders = self._orders(q, probe)
        scores = np.empty((q.shape[0], k), np.float32)
        rows = np.empty((q.shape[0], k), np.int64)
        for i in range(q.shape[0]):
            scores[i], rows[i], _, _ = gmco_kernels.ivf_scan(q[i], self._vectors, self._offsets, orders[i, :probe], k,
                                                             probe, 0, 0, allow, self.params.metric)
        return scores, rows

    def _search_filtered(self, q: np.ndarray, k: int, probe: int, allow, allowed: int
                         ) -> tuple[np.ndarray, np.ndarray]:
        scores = np.empty((q.shape[0], k), np.float32)
        rows = np.empty((q.shape[0], k), np.int64)
        if self.params.metric != "ip":  # the quota rule
            max_rows = int(MAX_VISIT_FRACTION * self.count)
            orders = self._orders(q, self.lists)
            lists, min_allowed = self.filtered_budget(probe, k, allowed)
            density = SPARSE_TRIGGER * allowed / max(self.count, 1)
            for i in range(q.shape[0]):
                scores[i], rows[i], _, _ = gmco_kernels.ivf_scan(q[i], self._vectors, self._offsets, orders[i], k,
                                                                 lists, min_allowed, max_rows, allow,
                                                                 self.params.metric, density, SPARSE_BOOST)
            return scores, rows
        # Inner product: lists by bound, stopping once no list left is expected to do better. No visit cap:
        # the scan scores at most the allowed rows, which is what the exact path would score.
        bounds = self.bounds(q)
        for i in range(q.shape[0]):
            order = np.argsort(-bounds[i], kind="stable")
            scores[i], rows[i], _, _ = gmco_kernels.ivf_scan(q[i], self._vectors, self._offsets, order, k, probe,
                                                             0, 0, allow, "ip", bound=bounds[i])
        return scores, rows

    # -- persistence -----------------------------------------------------------------------------
    def save(self, directory: Path) -> None:
        np.save(directory / _CENTROIDS, self._centroids)
        np.save(directory / _OFFSETS, self._offsets)
        np.save(directory / _SPREAD, self._spread)

    def load(self, directory: Path, vectors: np.ndarray | None) -> None:
        assert vectors is not None
        self._centroids = np.load(directory / _CENTROIDS)
        self._offsets = np.load(directory / _OFFSETS)
        if int(self._offsets[-1]) != vectors.shape[0]:
            raise ValueError(f"{directory}: IVF lists cover {int(self._offsets[-1])} rows, the segment has "
                             f"{vectors.shape[0]}")
        self._vectors = np.ascontiguousarray(vectors, dtype=np.float16)
        self.count = vectors.shape[0]
        spread = directory / _SPREAD
        if spread.is_file():
            self._spread = np.load(spread)
        else:  # a snapshot from before list spreads were kept: one pass over the rows
            log.info("ivf: %s has no list spreads; computing them from the rows", directory)
            self._spread = self._spreads(self._vectors)
        if self._spread.shape != (self.lists,):
            raise ValueError(f"{directory}: {self._spread.shape[0]} list spreads for {self.lists} lists")

    @property
    def nbytes(self) -> int:
        return self._centroids.nbytes + self._offsets.nbytes + self._spread.nbytes
