"""Exact search on an NVIDIA GPU with CuPy alone: the ``cupy`` backend, and the exact path of ``cuvs``.

Needs nothing beyond CuPy (the lent device image ships CuPy 14 for CUDA 13; no RAPIDS wheels), so it is
the GPU backend that works where cuVS cannot load. The segment's FP16 rows live on the device (the segment
keeps its host rows itself: :attr:`vectors` is None). One search, per chunk of queries and rows:

1. **Scores**: an FP16 matrix product (``cupy.matmul`` on float16 runs cuBLAS ``gemmEx`` with FP32
   accumulation on the tensor cores; the output is rounded to FP16). Queries are scaled to unit length
   first (the order of a query's scores does not change), so no score overflows FP16. L2 uses
   ``2 q.x - |x|^2``, in FP32.
2. **Filter**: the allow bitmap's uint64 words are unpacked on the device into a 0 / -inf row penalty
   added to the scores; padding rows (the row count is rounded up to ``BLOCK``) get -inf too.
3. **Top-k on the device**: ``cupy.argpartition`` sorts fully, so a whole score row is never sorted.
   Block maxima (``BLOCK`` scores each) are taken recursively; the k best blocks hold the k best scores
   (each block holding one of them has a maximum at least the k-th score, and each such block holds a
   score that high, so there are at most k of them), and only ``k * BLOCK`` candidates are sorted at
   each level. A running top-k is kept across row chunks.
4. **Refine**: the candidates (``2k + 16`` of them, so FP16 rounding cannot lose one) are rescored in FP32
   from the FP16 rows and the FP32 queries: scores match the CPU kernels', so segments merge cleanly.

Chunks are sized so one chunk's scores fit ``SCORE_BUDGET_BYTES``: a 1M x 1024 shard (2 GiB of rows) and
a 4,096-query batch run as 17 chunks of 244 queries over all rows. A filter that allows few rows
(``GATHER_FRACTION``) gathers them first and scans only those.

All device work runs on CuPy's per-thread default stream, so searches from several executor threads
overlap; cuVS (which uses ``cudaStreamPerThread`` by default) shares it in the ``cuvs`` backend.

UNVERIFIED on a GPU where it was written (none was lent): CPU stand-ins of CuPy ran it (docs/gpu.md).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import cupy as cp
import numpy as np
from gmco_common.errors import ResourceExhausted

from gmco_shard import bitmaps
from gmco_shard.index.base import VectorIndex
from gmco_shard.index.cuvs_support import check_fits, is_out_of_memory

log = logging.getLogger(__name__)

BLOCK = 32
# Below this width (or when k * BLOCK is not well under it) a score row is sorted directly.
DIRECT_WIDTH = 4096
SCORE_BUDGET_BYTES = 512 << 20
# Device memory kept free beside the rows: a search's scores plus cuBLAS workspaces and the CUDA context.
HEADROOM_BYTES = SCORE_BUDGET_BYTES + (512 << 20)
# A filter allowing at most this share of the rows gathers them and scans only those.
GATHER_FRACTION = 0.25
_UPLOAD_ROWS = 65536
_MIN_QUERY_CHUNK = 64

_logged = threading.Event()


def candidates(k: int, rows: int) -> int:
    """Candidates a search keeps for the FP32 rescoring: 2k + 16, at most the rows there are."""
    return max(1, min(rows, 2 * k + 16))


def chunk_shape(queries: int, rows: int, bytes_per_score: float,
                budget: int = SCORE_BUDGET_BYTES) -> tuple[int, int]:
    """(query rows, score columns) of one chunk: all rows when at least ``_MIN_QUERY_CHUNK`` queries fit
    the budget with them, else fewer rows (a multiple of ``BLOCK``); then as many queries as fit."""
    q_min = min(queries, _MIN_QUERY_CHUNK)
    cols = rows if q_min * rows * bytes_per_score <= budget else \
        max(BLOCK, int(budget / (q_min * bytes_per_score)) // BLOCK * BLOCK)
    qc = max(1, min(queries, int(budget // (cols * bytes_per_score))))
    return qc, cols


def top_indices(s, k: int):
    """Column indices of the ``k`` largest entries of each row of the device matrix ``s`` (in no order;
    all columns when there are at most ``k``)."""
    q, w = s.shape
    if k >= w:
        return cp.broadcast_to(cp.arange(w, dtype=cp.int64), (q, w)).copy()
    if w <= DIRECT_WIDTH or 2 * k * BLOCK > w or w % BLOCK:
        return cp.argsort(-s.astype(cp.float32), axis=1)[:, :k]
    blocks = top_indices(s.reshape(q, w // BLOCK, BLOCK).max(axis=2), k)
    cand = (blocks[:, :, None] * BLOCK + cp.arange(BLOCK, dtype=cp.int64)[None, None, :]).reshape(q, k * BLOCK)
    pick = top_indices(cp.take_along_axis(s, cand, axis=1), k)
    return cp.take_along_axis(cand, pick, axis=1)


def _best(scores, rows, k: int):
    """The k best (scores, rows) of each row, best first, of device (q, w) arrays."""
    order = cp.argsort(-scores, axis=1)[:, :k]
    return cp.take_along_axis(scores, order, axis=1), cp.take_along_axis(rows, order, axis=1)


class DeviceRows:
    """FP16 rows on the device, zero-padded to a multiple of ``BLOCK`` rows, searched exactly."""

    def __init__(self, vectors, metric: str, budget: int = SCORE_BUDGET_BYTES) -> None:
        n, dim = vectors.shape
        self.n, self.dim, self.metric, self.budget = n, dim, metric, budget
        padded = max(BLOCK, -(-n // BLOCK) * BLOCK)
        self.x = cp.zeros((padded, dim), dtype=cp.float16)
        for start in range(0, n, _UPLOAD_ROWS):
            stop = min(n, start + _UPLOAD_ROWS)
            self.x[start:stop] = cp.asarray(np.ascontiguousarray(vectors[start:stop], dtype=np.float16))
        self.norms = None  # squared L2 norms in FP32, for the l2 metric
        if metric == "l2":
            self.norms = cp.empty(padded, dtype=cp.float32)
            for start in range(0, padded, _UPLOAD_ROWS):
                part = self.x[start:start + _UPLOAD_ROWS].astype(cp.float32)
                self.norms[start:start + _UPLOAD_ROWS] = (part * part).sum(axis=1)
        self._padding = None
        if padded > n:
            pad = cp.zeros(padded, dtype=cp.float32)
            pad[n:] = -cp.inf
            self._padding = pad

    @staticmethod
    def device_bytes(rows: int, dim: int, metric: str) -> int:
        padded = max(BLOCK, -(-rows // BLOCK) * BLOCK)
        return padded * dim * 2 + (padded * 4 if metric == "l2" else 0) + padded * 4

    @property
    def padded(self) -> int:
        return self.x.shape[0]

    # -- filters ------------------------------------------------------------------------------------
    def clean_words(self, allow: np.ndarray) -> np.ndarray:
        """The bitmap's words over this segment's rows, with the bits past the last row cleared."""
        words = np.array(allow[: bitmaps.words_for(self.n)], dtype=np.uint64)
        if self.n % 64:
            words[-1] &= np.uint64((1 << (self.n % 64)) - 1)
        return words

    def allowed_rows(self, words: np.ndarray):
        """Bitmap words unpacked on the device: a bool vector over the padded rows (padding excluded)."""
        dev = cp.asarray(words)
        idx = cp.arange(self.padded, dtype=cp.int64)
        word = dev[cp.minimum(idx >> 6, dev.shape[0] - 1)]
        bits = (word >> (idx & 63).astype(cp.uint64)) & cp.uint64(1)
        return (bits == cp.uint64(1)) & (idx < self.n)

    # -- search -------------------------------------------------------------------------------------
    def search(self, queries: np.ndarray, k: int, allow: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Exact top-k: host (scores float32 (q, k), rows int64 (q, k)), higher scores better, padded
        with (-inf, -1) where fewer rows are allowed (or there are fewer than k rows)."""
        q32 = np.ascontiguousarray(queries, dtype=np.float32)
        nq = q32.shape[0]
        out_s = np.full((nq, k), -np.inf, np.float32)
        out_r = np.full((nq, k), -1, np.int64)
        if nq == 0 or k <= 0 or self.n == 0:
            return out_s, out_r
        words = None if allow is None else self.clean_words(allow)
        allowed = self.n if words is None else bitmaps.count(words)
        if allowed == 0:
            return out_s, out_r
        with cp.cuda.Stream.ptds:
            if words is None:
                s, r = self.search_device(q32, k, self._padding)
            else:
                mask = self.allowed_rows(words)
                if allowed <= GATHER_FRACTION * self.n:  # scan only the allowed rows, then map back
                    sub = cp.flatnonzero(mask)
                    s, r = _Gathered(self, sub).search_device(q32, k)
                    r = cp.where(r >= 0, sub[cp.maximum(r, 0)], -1)
                else:
                    s, r = self.search_device(q32, k, cp.where(mask, cp.float32(0), cp.float32(-cp.inf)))
            kk = s.shape[1]
            out_s[:, :kk] = cp.asnumpy(s)
            out_r[:, :kk] = cp.asnumpy(r)
        out_r[~np.isfinite(out_s)] = -1
        out_s[out_r < 0] = -np.inf
        return out_s, out_r

    def search_device(self, q32: np.ndarray, k: int, penalty=None):
        """Device (scores (q, kk), rows (q, kk)), kk = min(k, padded rows), best first; ``penalty`` is a
        0 / -inf FP32 vector over the padded rows (None: every row counts)."""
        n = self.padded
        kc = candidates(k, n)
        l2 = self.metric == "l2"
        qc, cols = chunk_shape(q32.shape[0], n, 6.2 if l2 else 2.2, self.budget)
        norms = np.linalg.norm(q32, axis=1)
        scale = (1.0 / np.where(norms > 0, norms, 1.0)).astype(np.float32)
        qd = cp.asarray(q32)
        qh = cp.asarray((q32 * scale[:, None]).astype(np.float16))
        scale_d = cp.asarray(scale)
        pen = None if penalty is None else penalty.astype(cp.float32 if l2 else cp.float16)
        parts_s, parts_r = [], []
        for q0 in range(0, q32.shape[0], qc):
            q1 = min(q32.shape[0], q0 + qc)
            best_s = best_r = None
            for c0 in range(0, n, cols):
                c1 = min(n, c0 + cols)
                s = cp.matmul(qh[q0:q1], self.x[c0:c1].T)  # FP16 in, FP32 accumulation, FP16 out
                if l2:
                    s = s.astype(cp.float32) * cp.float32(2) - self.norms[c0:c1][None, :] * scale_d[q0:q1, None]
                if pen is not None:
                    s += pen[None, c0:c1]
                idx = top_indices(s, min(kc, c1 - c0))
                cs = cp.take_along_axis(s, idx, axis=1).astype(cp.float32)
                cr = idx + c0
                if best_s is not None:
                    cs = cp.concatenate([best_s, cs], axis=1)
                    cr = cp.concatenate([best_r, cr], axis=1)
                best_s, best_r = _best(cs, cr, kc) if cs.shape[1] > kc else (cs, cr)
            s, r = self._refine(qd[q0:q1], best_s, best_r, min(k, best_r.shape[1]))
            parts_s.append(s)
            parts_r.append(r)
        return cp.concatenate(parts_s, axis=0), cp.concatenate(parts_r, axis=0)

    def _refine(self, qd, cand_s, cand_r, k: int):
        """FP32 scores of the candidate rows, the k best of them, best first; a candidate whose score in
        ``cand_s`` is -inf (filtered, padding, an empty slot) stays -inf with row -1."""
        live = cp.isfinite(cand_s)
        rows = cp.where(live, cand_r, 0)
        per_query = max(1, rows.shape[1]) * self.dim * 6
        step = max(1, int(self.budget // per_query))
        exact = cp.empty(rows.shape, dtype=cp.float32)
        for a in range(0, rows.shape[0], step):
            b = min(rows.shape[0], a + step)
            xs = self.x[rows[a:b]].astype(cp.float32)  # (q, c, dim)
            ip = cp.matmul(xs, qd[a:b, :, None])[:, :, 0]
            if self.metric == "l2":
                qn = (qd[a:b] * qd[a:b]).sum(axis=1)
                ip = -(self.norms[rows[a:b]] - ip * cp.float32(2) + qn[:, None])
            exact[a:b] = ip
        exact = cp.where(live, exact, cp.float32(-cp.inf))
        s, r = _best(exact, rows, k)
        return s, cp.where(cp.isfinite(s), r, -1)

    def rescore(self, q32: np.ndarray, rows, valid, k: int):
        """Device (scores, rows) of given candidate rows (device int64 (q, c); ``valid`` a bool mask of
        the real ones), rescored in FP32 and sorted: what an ANN search's results go through, so that
        their scores are exactly the CPU kernels' and the exact path's."""
        cand_s = cp.where(valid, cp.float32(0), cp.float32(-cp.inf))
        return self._refine(cp.asarray(q32), cand_s, cp.where(valid, rows, 0), k)


class _Gathered(DeviceRows):
    """The allowed rows of a ``DeviceRows``, copied out for a selective filter (same metric and budget)."""

    def __init__(self, parent: DeviceRows, rows) -> None:  # gathers on the device: no host upload
        self.n, self.dim, self.metric, self.budget = int(rows.shape[0]), parent.dim, parent.metric, parent.budget
        padded = max(BLOCK, -(-self.n // BLOCK) * BLOCK)
        self.x = cp.zeros((padded, self.dim), dtype=cp.float16)
        self.x[: self.n] = parent.x[rows]
        self.norms = None
        if parent.norms is not None:
            self.norms = cp.zeros(padded, dtype=cp.float32)
            self.norms[: self.n] = parent.norms[rows]
        self._padding = None
        if padded > self.n:
            pad = cp.zeros(padded, dtype=cp.float32)
            pad[self.n:] = -cp.inf
            self._padding = pad

    def search_device(self, q32: np.ndarray, k: int, penalty=None):
        return super().search_device(q32, k, self._padding if penalty is None else penalty)


@contextmanager
def device_errors(what: str) -> Iterator[None]:
    """Out-of-memory from CuPy, rmm or cuVS becomes ResourceExhausted; anything else propagates unchanged."""
    try:
        yield
    except Exception as exc:
        if is_out_of_memory(exc):
            raise ResourceExhausted(f"GPU memory exhausted {what}; send smaller batches, raise "
                                    "GMCO_SHARD_GPU_POOL_BYTES, or spread the slots over more shards") from exc
        raise


def device_name() -> str:
    try:
        props = cp.cuda.runtime.getDeviceProperties(cp.cuda.runtime.getDevice())
        name = props.get("name", b"?")
        return name.decode() if isinstance(name, bytes) else str(name)
    except Exception:  # noqa: BLE001 - only for the log line
        return "?"


def free_device_bytes() -> int:
    """Device memory this process can still take: the driver's free bytes plus CuPy's cached free blocks."""
    free, _ = cp.cuda.runtime.memGetInfo()
    return int(free) + int(cp.get_default_memory_pool().free_bytes())


class CupyIndex(VectorIndex):
    """The ``cupy`` backend: every search is exact, on the device (see the module docstring)."""

    name = "cupy"
    on_gpu = True

    def __init__(self, dim, params) -> None:
        super().__init__(dim, params)
        self._rows: DeviceRows | None = None
        if not _logged.is_set():
            _logged.set()
            log.info("index backend cupy: exact FP16 search on %s with CuPy %s (no cuVS)", device_name(),
                     cp.__version__)

    def build(self, vectors: np.ndarray, progress: bool = False) -> None:
        rows = vectors.shape[0]
        self._rows = None  # a rebuild frees the old rows first
        need = DeviceRows.device_bytes(rows, self.dim, self.params.metric)
        check_fits(need, max(0, free_device_bytes() - HEADROOM_BYTES), rows)
        with device_errors(f"placing {rows} rows on the device"):
            self._rows = DeviceRows(vectors, self.params.metric)
            cp.cuda.Stream.ptds.synchronize()
        self.count = rows

    def search(self, queries, k, allow=None, ef=0):
        return self.exact_search(queries, k, allow)

    def exact_search(self, queries: np.ndarray, k: int,
                     allow: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        if self._rows is None:
            q = np.asarray(queries).shape[0]
            return np.full((q, k), -np.inf, np.float32), np.full((q, k), -1, np.int64)
        with device_errors(f"searching {len(queries)} queries"):
            return self._rows.search(queries, k, allow)

    def save(self, directory: Path) -> None:
        """Nothing: the snapshot writes the segment's rows, and a load uploads them again."""

    def load(self, directory: Path, vectors: np.ndarray | None) -> None:
        assert vectors is not None
        self.build(vectors)

    def retire(self) -> None:
        self._rows = None  # the device rows go back to the pool now, not at garbage collection

    @property
    def device_bytes(self) -> int:
        return 0 if self._rows is None else DeviceRows.device_bytes(self.count, self.dim, self.params.metric)

    @property
    def nbytes(self) -> int:
        return 0  # host bytes: none beyond the rows the segment keeps


def scan_host_rows(vectors: np.ndarray, queries: np.ndarray, k: int, metric: str,
                   allow: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Exact search of host FP16 rows on the device (uploaded for this call): for a growing segment."""
    with device_errors(f"scanning {vectors.shape[0]} rows"):
        return DeviceRows(vectors, metric).search(queries, k, allow)
