"""The interface every index backend implements (exact, HNSW, CAGRA, Milvus) and the lazy registry.

An index covers the rows of one sealed segment, numbered 0..n-1. Search returns, per query, the top-k
row numbers with scores (higher is better: inner product, or the negated squared L2 distance), padded
with row -1 and score -inf. ``allow`` is an optional row bitmap (``gmco_shard.bitmaps``) pre-filter.

One copy of the vectors: an index that keeps the segment's FP16 rows on the host (HNSW over FP16 storage)
hands them out as ``vectors``, and the segment reads its rows from there instead of keeping its own.
"""

from __future__ import annotations

import importlib
import sys
from abc import ABC, abstractmethod
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from gmco.common.v1 import common_pb2
from gmco_common.config import ConfigError

from gmco_shard.columns import AttributeColumns
from gmco_shard.index.params import IndexParams

if TYPE_CHECKING:
    from gmco_kernels import Graph


class VectorIndex(ABC):
    name: str = "?"
    # The backend searches its own rows exactly (no ANN structure): the store scans them with the kernels.
    exact: bool = False
    # ``save`` writes the FP16 rows too (in the index's own file), so the snapshot need not write them again.
    saves_rows: bool = False
    # The backend computes on an NVIDIA GPU: the shard then exports GPU telemetry and runs the CUDA health gate.
    on_gpu: bool = False

    def __init__(self, dim: int, params: IndexParams) -> None:
        self.dim = dim
        self.params = params
        self.count = 0

    @abstractmethod
    def build(self, vectors: np.ndarray, progress: bool = False) -> None:
        """Index ``vectors`` (n x dim, float16; may be a memory map, read in chunks). Replaces any content."""

    @abstractmethod
    def search(self, queries: np.ndarray, k: int, allow: np.ndarray | None = None,
               ef: int = 0) -> tuple[np.ndarray, np.ndarray]:
        """(scores float32 (q, k), rows int64 (q, k)); ``ef`` 0 = the configured default."""

    @abstractmethod
    def save(self, directory: Path) -> None: ...

    @abstractmethod
    def load(self, directory: Path, vectors: np.ndarray | None) -> None:
        """Restore from ``save``; ``vectors`` are the segment's rows when the backend keeps none itself
        (None when it does: its own file holds them)."""

    @property
    def vectors(self) -> np.ndarray | None:
        """The segment's FP16 rows as this index stores them on the host, or None when it keeps none."""
        return None

    def layout(self, vectors: np.ndarray) -> np.ndarray | None:
        """The row order this index wants its segment in (IVF groups rows by list), or None for any order.
        The store permutes the rows and their columns by it, then calls ``build`` with them in that order."""
        return None

    @property
    def graph(self) -> Graph | None:
        """The proximity graph, for the filtered (ACORN-style) search; None when the backend has none."""
        return None

    @property
    @abstractmethod
    def nbytes(self) -> int:
        """Host bytes of the index beyond the FP16 rows it may share with the segment."""

    def close(self) -> None:
        """Release what the index holds outside this process (a remote collection's client, say)."""

    def retire(self) -> None:
        """The store replaced this index's segment: free what it holds elsewhere (a Milvus collection)."""


class FilteringIndex(VectorIndex):
    """Optional capability: a backend that keeps the attribute columns and evaluates a ``Filter`` itself.

    For a backend that cannot take a row bitmap (Milvus takes a boolean expression), the store builds it
    with the sealed rows' columns and, for a filtered search, hands over the request's ``Filter`` plus
    the sealed rows it must hide (tombstones) instead of an allow bitmap. ``search`` with an allow bitmap
    still works (the backend turns it into a row list), and ``build`` without columns indexes rows
    that carry no attributes, which is enough for bitmap-only use.
    """

    @abstractmethod
    def build_with_columns(self, vectors: np.ndarray, cols: AttributeColumns, progress: bool = False) -> None:
        """Index ``vectors`` with their attribute columns (row i of both describe the same item)."""

    @abstractmethod
    def search_filter(self, queries: np.ndarray, k: int, flt: common_pb2.Filter | None, hidden_rows: np.ndarray,
                      ef: int = 0) -> tuple[np.ndarray, np.ndarray]:
        """Like ``search``, over the rows that pass ``flt`` and are not in ``hidden_rows``."""


# name -> ("module:Class", what to install when the import fails)
BACKENDS: dict[str, tuple[str, str]] = {
    "exact": ("gmco_shard.index.exact:ExactIndex", ""),
    "ivf": ("gmco_shard.index.ivf:IvfIndex", "faiss-cpu"),
    "hnsw": ("gmco_shard.index.hnsw:HnswIndex", "faiss-cpu"),
    "cuvs": ("gmco_shard.index.cuvs:CagraIndex", "the shard's gpu extra: uv sync --package gmco-shard --extra gpu"),
    # Exact search on the GPU with CuPy alone (no RAPIDS): the GPU backend for where cuVS cannot load.
    "cupy": ("gmco_shard.index.cupy:CupyIndex", "CuPy for CUDA 13: pip install cupy-cuda13x, or the gpu extra"),
    "milvus": ("gmco_shard.index.milvus:MilvusIndex", "the shard's milvus extra: uv sync --package gmco-shard --extra milvus"),
}


def backend_class(name: str) -> type[VectorIndex]:
    try:
        target, install = BACKENDS[name]
    except KeyError:
        raise ConfigError(f"unknown index backend {name!r}; choose one of {', '.join(BACKENDS)}") from None
    module_name, cls_name = target.split(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        if exc.name:  # a package is missing
            raise ConfigError(f"index backend {name!r} is not installed ({exc.name} missing); install {install}") \
                from exc
        hint = "; or GMCO_SHARD_INDEX_BACKEND=cupy for exact search on the GPU without cuVS" if name == "cuvs" else ""
        raise ConfigError(f"index backend {name!r} is installed but cannot load: {exc}{hint}") from exc
    return getattr(module, cls_name)


@contextmanager
def build_threads(threads: int) -> Iterator[None]:
    """Index builds started by the calling thread inside the block use at most ``threads`` OpenMP threads
    (faiss's k-means, assignment and graph builds). OpenMP keeps the setting per thread, so a background
    build is capped while a build on another thread (the start-up load) keeps every core. A process whose
    backend has not loaded faiss (exact, cuvs, milvus) has nothing to cap, and does not pay the 40 MB of
    RSS that loading it costs."""
    faiss = sys.modules.get("faiss")
    if faiss is None:
        yield
        return
    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(max(1, threads))
    try:
        yield
    finally:
        faiss.omp_set_num_threads(before)


def create_index(name: str, dim: int, params: IndexParams) -> VectorIndex:
    return backend_class(name)(dim, params)


def topk(scores: np.ndarray, rows: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Top-k per row of (scores, rows), sorted by descending score, padded with (-inf, -1)."""
    q, n = scores.shape
    if n < k:
        scores = np.concatenate([scores, np.full((q, k - n), -np.inf, np.float32)], axis=1)
        rows = np.concatenate([rows, np.full((q, k - n), -1, np.int64)], axis=1)
        n = k
    part = np.argpartition(-scores, k - 1, axis=1)[:, :k] if n > k else np.broadcast_to(np.arange(k), (q, k))
    s = np.take_along_axis(scores, part, 1)
    r = np.take_along_axis(rows, part, 1)
    order = np.argsort(-s, axis=1, kind="stable")
    s, r = np.take_along_axis(s, order, 1), np.take_along_axis(r, order, 1)
    r[~np.isfinite(s)] = -1
    return s.astype(np.float32), r.astype(np.int64)
