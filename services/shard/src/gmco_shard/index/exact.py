"""Exact search in numpy: float32 compute over FP16 storage, in chunks."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from gmco_shard.index.base import VectorIndex, score_block, topk

CHUNK = 32768


def exact_search(vectors: np.ndarray, queries: np.ndarray, k: int, metric: str,
                 rows: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Top-k over ``vectors`` (or only over ``rows`` of it); returns row numbers of ``vectors``."""
    q = np.asarray(queries, dtype=np.float32)
    best_s = np.full((q.shape[0], k), -np.inf, np.float32)
    best_r = np.full((q.shape[0], k), -1, np.int64)
    total = vectors.shape[0] if rows is None else rows.shape[0]
    for start in range(0, total, CHUNK):
        if rows is None:
            block, ids = vectors[start:start + CHUNK], np.arange(start, min(start + CHUNK, total))
        else:
            ids = rows[start:start + CHUNK]
            block = vectors[ids]
        s = score_block(q, block, metric)
        best_s, best_r = topk(np.concatenate([best_s, s], 1),
                              np.concatenate([best_r, np.broadcast_to(ids, s.shape)], 1), k)
    return best_s, best_r


class ExactIndex(VectorIndex):
    name = "exact"

    def __init__(self, dim, params) -> None:
        super().__init__(dim, params)
        self._vectors = np.empty((0, dim), np.float16)

    def build(self, vectors: np.ndarray, progress: bool = False) -> None:
        self._vectors = vectors
        self.count = vectors.shape[0]

    def search(self, queries, k, allow=None, ef=0):
        rows = None if allow is None else np.flatnonzero(allow[: self.count])
        return exact_search(self._vectors, queries, k, self.params.metric, rows)

    def save(self, directory: Path) -> None:
        """Nothing to save: the segment's vectors are the index."""

    def load(self, directory: Path, vectors: np.ndarray) -> None:
        self.build(vectors)

    @property
    def nbytes(self) -> int:
        return 0
