"""HNSW on CPU (faiss) over FP16 storage: the index's storage *is* the segment's row table.

``faiss.IndexHNSWSQ`` with the ``QT_fp16`` scalar quantizer keeps each row as its FP16 bytes, which is
exactly how the shard stores vectors; the segment reads its rows from a zero-copy view of those codes
(``vectors``), so the process holds one copy of the vectors (a flat float32 HNSW kept a second, 2x larger
copy beside the shard's own). faiss computes FP16 distances with AVX2/AVX-512 and releases the GIL.

Pre-filtering passes the allow bitmap to faiss as an ``IDSelectorBitmap`` (same bit layout as
``gmco_shard.bitmaps``). The graph is also exposed (``graph``) for the kernels' ACORN-style search, which
the planner uses when a filter is selective. Inner product runs on normalised vectors; L2 as an option.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np

# faiss's loader logs, at INFO, each SIMD module it tries and does not find (dynamic-dispatch builds have none).
logging.getLogger("faiss.loader").setLevel(logging.WARNING)
import faiss
from gmco_kernels import Graph

from gmco_shard.index.base import VectorIndex

log = logging.getLogger(__name__)

_FILE = "hnsw.faiss"
_ADD_CHUNK = 10000


class HnswIndex(VectorIndex):
    name = "hnsw"
    saves_rows = True  # the faiss file holds the FP16 codes: the rows

    def __init__(self, dim, params) -> None:
        super().__init__(dim, params)
        self._index = self._new()
        self._vectors: np.ndarray | None = None
        self._graph: Graph | None = None

    def _new(self) -> faiss.IndexHNSWSQ:
        metric = faiss.METRIC_INNER_PRODUCT if self.params.metric == "ip" else faiss.METRIC_L2
        index = faiss.IndexHNSWSQ(self.dim, faiss.ScalarQuantizer.QT_fp16, self.params.hnsw.m, metric)
        index.hnsw.efConstruction = self.params.hnsw.ef_construction
        index.hnsw.efSearch = self.params.hnsw.ef_search
        return index

    def build(self, vectors: np.ndarray, progress: bool = False) -> None:
        from tqdm import tqdm

        index = self._new()
        n = vectors.shape[0]
        start = time.perf_counter()
        with tqdm(total=n, desc="hnsw build", unit="row", unit_scale=True, disable=not progress) as bar:
            for s in range(0, n, _ADD_CHUNK):
                chunk = np.ascontiguousarray(vectors[s:s + _ADD_CHUNK], dtype=np.float32)
                index.add(chunk)
                bar.update(chunk.shape[0])
        if n >= 100_000:
            log.info("hnsw built over %d rows in %.0f s (M %d, efConstruction %d)", n, time.perf_counter() - start,
                     self.params.hnsw.m, self.params.hnsw.ef_construction)
        self._adopt(index)

    def _adopt(self, index: faiss.IndexHNSWSQ) -> None:
        self._index = index
        self.count = n = index.ntotal
        storage = faiss.downcast_index(index.storage)
        codes = storage.codes
        raw = np.frombuffer(faiss.rev_swig_ptr(codes.data(), n * storage.code_size), np.uint8) if n else \
            np.empty(0, np.uint8)
        self._vectors = raw.view(np.float16).reshape(n, self.dim)
        h = index.hnsw
        neighbors = np.frombuffer(faiss.rev_swig_ptr(h.neighbors.data(), h.neighbors.size() * 4), np.int32) \
            if n else np.empty(0, np.int32)
        offsets = faiss.vector_to_array(h.offsets).astype(np.uint64)
        cum = faiss.vector_to_array(h.cum_nneighbor_per_level).astype(np.int32)
        self._graph = Graph(neighbors, offsets, cum, h.entry_point, h.max_level, n)

    @property
    def vectors(self) -> np.ndarray | None:
        return self._vectors

    @property
    def graph(self) -> Graph | None:
        return self._graph if self.count else None

    def search(self, queries, k, allow=None, ef=0):
        params = faiss.SearchParametersHNSW()
        params.efSearch = max(ef or self.params.hnsw.ef_search, k)
        if allow is not None:
            # the bitmap's bytes back the selector until we return
            params.sel = faiss.IDSelectorBitmap(self.count, faiss.swig_ptr(allow.view(np.uint8)))
        q = np.ascontiguousarray(queries, dtype=np.float32)
        dist, rows = self._index.search(q, k, params=params)
        scores = dist if self.params.metric == "ip" else -dist
        return np.where(rows < 0, -np.inf, scores).astype(np.float32), rows.astype(np.int64)

    def save(self, directory: Path) -> None:
        faiss.write_index(self._index, str(directory / _FILE))

    def load(self, directory: Path, vectors: np.ndarray | None) -> None:
        index = faiss.read_index(str(directory / _FILE))
        index.hnsw.efSearch = self.params.hnsw.ef_search
        self._adopt(index)

    @property
    def nbytes(self) -> int:
        """The graph: neighbour lists (int32), offsets and levels."""
        h = self._index.hnsw
        return h.neighbors.size() * 4 + h.offsets.size() * 8 + h.levels.size() * 4
