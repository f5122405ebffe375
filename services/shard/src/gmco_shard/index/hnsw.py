"""HNSW on CPU (faiss). Inner product runs on normalised vectors; L2 as an option.

Pre-filtering passes the allow-bitset to faiss as an ``IDSelectorBitmap`` so that graph traversal
skips disallowed rows. faiss releases the GIL during search and build.

The exact path for selective filters (``exact_search``) scans the float32 copy that the graph keeps
as its flat storage, instead of converting the shard's FP16 rows on every query: faiss's selector scan
for a few queries, numpy BLAS over a zero-copy view of the storage for larger batches.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

# faiss's loader logs, at INFO, each SIMD module it tries and does not find (dynamic-dispatch builds have none).
logging.getLogger("faiss.loader").setLevel(logging.WARNING)
import faiss

from gmco_shard.index.base import VectorIndex
from gmco_shard.index.exact import exact_search

_FILE = "hnsw.faiss"
_ADD_CHUNK = 20000
# Up to this many queries the faiss selector scan beats gathering rows for BLAS (measured at 100k x 1024,
# 10% allowed: 5.5 vs 17 ms at batch 1, 96 vs 37 ms at batch 32).
_SCAN_MAX_QUERIES = 4


class HnswIndex(VectorIndex):
    name = "hnsw"

    def __init__(self, dim, params) -> None:
        super().__init__(dim, params)
        self._index = self._new()

    def _new(self) -> faiss.IndexHNSWFlat:
        metric = faiss.METRIC_INNER_PRODUCT if self.params.metric == "ip" else faiss.METRIC_L2
        index = faiss.IndexHNSWFlat(self.dim, self.params.hnsw_m, metric)
        index.hnsw.efConstruction = self.params.hnsw_ef_construction
        index.hnsw.efSearch = self.params.hnsw_ef_search
        return index

    def build(self, vectors: np.ndarray, progress: bool = False) -> None:
        from tqdm import tqdm

        index = self._new()
        for start in tqdm(range(0, vectors.shape[0], _ADD_CHUNK), desc="hnsw build", unit="chunk",
                          disable=not progress):
            index.add(np.ascontiguousarray(vectors[start:start + _ADD_CHUNK], dtype=np.float32))
        self._index = index
        self.count = vectors.shape[0]

    def _select(self, params: faiss.SearchParameters, allow: np.ndarray) -> np.ndarray:
        """Restrict ``params`` to the rows set in ``allow``; returns the bitmap, which must outlive the search."""
        bits = np.packbits(allow[: self.count].astype(np.uint8), bitorder="little")
        params.sel = faiss.IDSelectorBitmap(self.count, faiss.swig_ptr(bits))
        return bits

    def _scores(self, dist: np.ndarray, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """faiss distances as scores (higher is better), -inf where faiss found no row."""
        scores = dist if self.params.metric == "ip" else -dist
        return np.where(rows < 0, -np.inf, scores).astype(np.float32), rows.astype(np.int64)

    def search(self, queries, k, allow=None, ef=0):
        params = faiss.SearchParametersHNSW()
        params.efSearch = max(ef or self.params.hnsw_ef_search, k)
        _bits = None if allow is None else self._select(params, allow)  # backs params.sel until we return
        q = np.ascontiguousarray(queries, dtype=np.float32)
        dist, rows = self._index.search(q, k, params=params)
        return self._scores(dist, rows)

    def exact_search(self, queries, k, allow):
        """Exact top-k over the rows set in ``allow`` (bool over the indexed rows), from the float32 storage."""
        q = np.ascontiguousarray(queries, dtype=np.float32)
        storage = faiss.downcast_index(self._index.storage)
        if q.shape[0] <= _SCAN_MAX_QUERIES:
            params = faiss.SearchParameters()
            _bits = self._select(params, allow)  # backs params.sel until we return
            dist, rows = storage.search(q, k, params=params)
            return self._scores(dist, rows)
        # A view, not a copy, of memory the index owns: used only within this call, while the index lives.
        vectors = faiss.rev_swig_ptr(storage.get_xb(), self.count * self.dim).reshape(self.count, self.dim)
        return exact_search(vectors, q, k, self.params.metric, np.flatnonzero(allow[: self.count]))

    def save(self, directory: Path) -> None:
        faiss.write_index(self._index, str(directory / _FILE))

    def load(self, directory: Path, vectors: np.ndarray) -> None:
        self._index = faiss.read_index(str(directory / _FILE))
        self._index.hnsw.efSearch = self.params.hnsw_ef_search
        self.count = self._index.ntotal

    @property
    def nbytes(self) -> int:
        # Flat storage plus the graph links (int32 neighbours, ~2*M per node on level 0).
        return self.count * (self.dim * 4 + self.params.hnsw_m * 2 * 4)
