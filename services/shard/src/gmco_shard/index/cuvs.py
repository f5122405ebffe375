"""CAGRA on an NVIDIA GPU (cuVS), with FP16 vectors on the device, an rmm pool allocator, the allow
mask as a cuVS bitset pre-filter, GPU brute force for selective filters, and serialisation into the
shard snapshot.

UNVERIFIED: no GPU was available where this was written; the `gpu` tests in
services/shard/tests/test_shard_gpu.py and `make bench-gpu` are what prove it (docs/gpu.md).
Imports of cupy/cuvs/rmm happen here only, so CPU installs never load them.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from gmco_common.errors import ResourceExhausted
from gmco_shard.index.base import VectorIndex

import cupy as cp  # noqa: E402  (ImportError here is what the registry turns into "install the gpu extra")
from cuvs.neighbors import brute_force, cagra, filters  # noqa: E402

_FILE = "cagra.bin"
# Defaults tuned for recall at 100k+ rows; cuVS's own (graph_degree 64, itopk 64) give lower recall.
DEFAULTS = {"graph_degree": 64, "intermediate_graph_degree": 128, "itopk_size": 128, "search_width": 4}
_pool_ready = False


def _init_pool() -> None:
    """An rmm pool for every device allocation (cupy included), sized by GMCO_SHARD_GPU_POOL_BYTES."""
    global _pool_ready
    if _pool_ready:
        return
    import rmm
    from rmm.allocators.cupy import rmm_cupy_allocator

    size = int(os.environ.get("GMCO_SHARD_GPU_POOL_BYTES", "0")) or None
    rmm.reinitialize(pool_allocator=True, initial_pool_size=size)
    cp.cuda.set_allocator(rmm_cupy_allocator)
    _pool_ready = True


def _bitset(allow: np.ndarray) -> cp.ndarray:
    """uint32 words, bit i = row i allowed (cuVS: 1 = keep)."""
    words = np.packbits(allow.astype(np.uint8), bitorder="little")
    words = np.pad(words, (0, (-len(words)) % 4))
    return cp.asarray(words.view(np.uint32))


class CagraIndex(VectorIndex):
    name = "cuvs"

    def __init__(self, dim, params) -> None:
        super().__init__(dim, params)
        _init_pool()
        extra = params.extra
        self.graph_degree = int(extra.get("graph_degree", DEFAULTS["graph_degree"]))
        self.intermediate_graph_degree = int(extra.get("intermediate_graph_degree",
                                                       DEFAULTS["intermediate_graph_degree"]))
        self.itopk_size = int(extra.get("itopk_size", DEFAULTS["itopk_size"]))
        self.search_width = int(extra.get("search_width", DEFAULTS["search_width"]))
        self._metric = "inner_product" if params.metric == "ip" else "sqeuclidean"
        self._index = None
        self._dataset: cp.ndarray | None = None

    def build(self, vectors: np.ndarray, progress: bool = False) -> None:
        try:
            self._dataset = cp.asarray(np.ascontiguousarray(vectors, dtype=np.float16))
            ip = cagra.IndexParams(metric=self._metric, graph_degree=self.graph_degree,
                                   intermediate_graph_degree=self.intermediate_graph_degree)
            self._index = cagra.build(ip, self._dataset)
        except MemoryError as exc:
            raise ResourceExhausted(f"GPU memory exhausted building CAGRA over {len(vectors)} rows; "
                                    "raise GMCO_SHARD_GPU_POOL_BYTES or use more shards") from exc
        self.count = vectors.shape[0]

    def _scores(self, dist: cp.ndarray) -> cp.ndarray:
        return dist if self._metric == "inner_product" else -dist

    def search(self, queries, k, allow=None, ef=0):
        q = cp.asarray(np.ascontiguousarray(queries, dtype=np.float16))
        sp = cagra.SearchParams(itopk_size=max(ef or self.itopk_size, k), search_width=self.search_width)
        try:
            if allow is None:
                dist, rows = cagra.search(sp, self._index, q, k)
            else:
                dist, rows = cagra.search(sp, self._index, q, k, filter=filters.from_bitset(_bitset(allow[: self.count])))
        except MemoryError as exc:
            raise ResourceExhausted("GPU memory exhausted during search; retry with a smaller batch") from exc
        return self._finish(dist, rows)

    def exact_search(self, queries: np.ndarray, k: int, allow: np.ndarray | None = None):
        """GPU brute force over the device copy (the fallback for selective filters)."""
        q = cp.asarray(np.ascontiguousarray(queries, dtype=np.float16))
        bf = brute_force.build(self._dataset, metric=self._metric)
        pre = None if allow is None else filters.from_bitset(_bitset(allow[: self.count]))
        dist, rows = brute_force.search(bf, q, k, prefilter=pre)
        return self._finish(dist, rows)

    def _finish(self, dist, rows):
        d = cp.asnumpy(cp.asarray(self._scores(cp.asarray(dist)), dtype=cp.float32))
        r = cp.asnumpy(cp.asarray(rows)).astype(np.int64)
        bad = (r < 0) | (r >= self.count)
        r[bad] = -1
        d[bad] = -np.inf
        return d, r

    def save(self, directory: Path) -> None:
        cagra.save(str(directory / _FILE), self._index, include_dataset=True)

    def load(self, directory: Path, vectors: np.ndarray) -> None:
        self._dataset = cp.asarray(np.ascontiguousarray(vectors, dtype=np.float16))
        self._index = cagra.load(str(directory / _FILE))
        self.count = vectors.shape[0]

    @property
    def nbytes(self) -> int:
        return self.count * (self.dim * 2 + self.graph_degree * 4)
