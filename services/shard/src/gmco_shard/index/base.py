"""The index interface every backend implements (exact, HNSW, CAGRA, Milvus) and the lazy registry.

An index covers the rows of one sealed segment, numbered 0..n-1. Search returns, per query, the top-k
row numbers with scores (higher is better: inner product, or the negated squared L2 distance), padded
with row -1 and score -inf. ``allow`` is an optional boolean pre-filter over the rows.
"""

from __future__ import annotations

import importlib
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from gmco.common.v1 import common_pb2
from gmco_common.config import ConfigError

from gmco_shard.filters import AttributeColumns

METRICS = ("ip", "l2")


@dataclass(frozen=True)
class IndexParams:
    """Backend build/search parameters; each backend reads the ones it knows."""

    metric: str = "ip"
    hnsw_m: int = 32
    hnsw_ef_construction: int = 200
    hnsw_ef_search: int = 128
    extra: dict[str, str] = field(default_factory=dict)


class VectorIndex(ABC):
    name: str = "?"

    def __init__(self, dim: int, params: IndexParams) -> None:
        if params.metric not in METRICS:
            raise ConfigError(f"unknown metric {params.metric!r}; use one of {', '.join(METRICS)}")
        self.dim = dim
        self.params = params
        self.count = 0

    @abstractmethod
    def build(self, vectors: np.ndarray, progress: bool = False) -> None:
        """Index ``vectors`` (n x dim, float16). Replaces any previous content."""

    @abstractmethod
    def search(self, queries: np.ndarray, k: int, allow: np.ndarray | None = None,
               ef: int = 0) -> tuple[np.ndarray, np.ndarray]:
        """(scores float32 (q, k), rows int64 (q, k)); ``ef`` 0 = the configured default."""

    @abstractmethod
    def save(self, directory: Path) -> None: ...

    @abstractmethod
    def load(self, directory: Path, vectors: np.ndarray) -> None:
        """Restore from ``save``; ``vectors`` are the segment's rows (backends that keep none ignore it)."""

    @property
    @abstractmethod
    def nbytes(self) -> int: ...



class FilteringIndex(VectorIndex):
    """Optional capability: a backend that keeps the attribute columns and evaluates a ``Filter`` itself.

    For a backend that cannot take a row bitmap (Milvus takes a boolean expression), the store builds it
    with the sealed rows' columns and, for a filtered search, hands over the request's ``Filter`` plus
    the sealed rows it must hide (tombstones) instead of an allow mask. ``search`` with an allow mask
    still works (the backend turns the mask into a row list), and ``build`` without columns indexes rows
    that carry no attributes, which is enough for mask-only use.
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
    "hnsw": ("gmco_shard.index.hnsw:HnswIndex", "faiss-cpu"),
    "cuvs": ("gmco_shard.index.cuvs:CagraIndex", "the shard's gpu extra: uv sync --package gmco-shard --extra gpu"),
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
        raise ConfigError(f"index backend {name!r} is not installed ({exc.name} missing); install {install}") from exc
    return getattr(module, cls_name)


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


def score_block(queries: np.ndarray, block: np.ndarray, metric: str) -> np.ndarray:
    """Similarity of float32 queries against a float16/float32 block (higher is better)."""
    b = np.asarray(block, dtype=np.float32)
    ip = queries @ b.T
    if metric == "ip":
        return ip
    return 2 * ip - (queries * queries).sum(1, keepdims=True) - (b * b).sum(1)[None, :]
