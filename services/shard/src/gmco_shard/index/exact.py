"""The exact backend: no ANN structure; the segment's FP16 rows are scanned by the C kernel."""

from __future__ import annotations

from pathlib import Path

import gmco_kernels
import numpy as np

from gmco_shard.index.base import VectorIndex


def exact_search(vectors: np.ndarray, queries: np.ndarray, k: int, metric: str,
                 rows: np.ndarray | None = None, allow: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k over FP16 ``vectors`` (only over ``rows``, or the rows set in the ``allow`` bitmap);
    returns row numbers of ``vectors``."""
    x = vectors if vectors.dtype == np.float16 and vectors.flags.c_contiguous else \
        np.ascontiguousarray(vectors, dtype=np.float16)
    return gmco_kernels.scan(queries, x, k, metric, allow=allow, rows=rows)


class ExactIndex(VectorIndex):
    name = "exact"
    exact = True

    def __init__(self, dim, params) -> None:
        super().__init__(dim, params)
        self._vectors = np.empty((0, dim), np.float16)

    def build(self, vectors: np.ndarray, progress: bool = False) -> None:
        self._vectors = np.ascontiguousarray(vectors, dtype=np.float16)
        self.count = vectors.shape[0]

    @property
    def vectors(self) -> np.ndarray | None:
        return self._vectors

    def search(self, queries, k, allow=None, ef=0):
        return exact_search(self._vectors, queries, k, self.params.metric, allow=allow)

    def save(self, directory: Path) -> None:
        """Nothing beyond the segment's vectors, which the snapshot writes."""

    def load(self, directory: Path, vectors: np.ndarray | None) -> None:
        assert vectors is not None
        self.build(vectors)

    @property
    def nbytes(self) -> int:
        return 0
