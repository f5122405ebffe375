"""The shard's CPU inner loops (see kernels.c): exact FP16 top-k scans, bitmap-to-rows and ACORN-style
filtered search over a faiss HNSW graph. Arrays in, arrays out; every call releases the GIL.

Bitmaps are uint64 words, row i = bit (i % 64) of word i // 64 (``numpy.packbits(bitorder="little")``
viewed as ``<u8``, the layout faiss's ``IDSelectorBitmap`` reads too).
"""

from __future__ import annotations

import ctypes
import importlib.util
import threading
from pathlib import Path

import numpy as np

_spec = importlib.util.find_spec("gmco_kernels._kernels")
if _spec is None or _spec.origin is None:
    raise ImportError("gmco_kernels._kernels is not built: run `make setup` (it compiles libs/kernels/src/"
                      "gmco_kernels/kernels.c with the system C compiler)")
importlib.import_module("gmco_kernels._kernels")  # runs the module init, which picks the SIMD level
_lib = ctypes.CDLL(str(Path(_spec.origin)))

_f32p = ctypes.POINTER(ctypes.c_float)
_i64p = ctypes.POINTER(ctypes.c_int64)
_u64p = ctypes.c_void_p
_vp = ctypes.c_void_p
_i64 = ctypes.c_int64

_lib.gk_simd_level.restype = ctypes.c_int
_lib.gk_scan.restype = _i64
_lib.gk_scan.argtypes = [_vp, _i64, _i64, _vp, _i64, _vp, _vp, _i64, ctypes.c_int, _i64, _vp, _vp, _vp, _vp, _vp]
_lib.gk_bits_to_rows.restype = _i64
_lib.gk_bits_to_rows.argtypes = [_vp, _i64, _i64, _vp]
_lib.gk_ivf.restype = _i64
_lib.gk_ivf.argtypes = [_vp, _i64, _vp, _i64, _vp, _vp, _i64, _i64, _i64, _i64, _vp, ctypes.c_double, _i64, _vp,
                        ctypes.c_int, _i64, _vp, _vp, _vp, _vp, _vp, _vp]
_lib.gk_rows_f32.restype = None
_lib.gk_rows_f32.argtypes = [_vp, _i64, _vp, _i64, _vp]
_lib.gk_acorn.restype = _i64
_lib.gk_acorn.argtypes = [_vp, _i64, _vp, _i64, _vp, _vp, _vp, ctypes.c_int32, ctypes.c_int32, _vp, _i64, _i64,
                          ctypes.c_int, _i64, _vp, ctypes.c_uint32, _vp, _vp, _vp, _vp, _vp, _vp]

METRICS = {"ip": 0, "l2": 1}
SIMD = {0: "scalar", 1: "avx2", 2: "avx512"}[_lib.gk_simd_level()]


def _ptr(a: np.ndarray | None) -> int | None:
    return None if a is None else a.ctypes.data


def _words(bitmap: np.ndarray | None) -> np.ndarray | None:
    if bitmap is None:
        return None
    if bitmap.dtype != np.uint64 or not bitmap.flags.c_contiguous:
        raise TypeError("bitmaps are C-contiguous uint64 word arrays")
    return bitmap


def scan(queries: np.ndarray, vectors: np.ndarray, k: int, metric: str = "ip", allow: np.ndarray | None = None,
         rows: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k of ``queries`` (float32, q x d) over FP16 ``vectors`` (n x d): the ``rows`` listed, or
    the rows set in the ``allow`` bitmap, or all. Returns (scores float32 (q, k), rows int64 (q, k)),
    best first, padded with (-inf, -1)."""
    q = np.ascontiguousarray(queries, dtype=np.float32)
    if q.ndim == 1:
        q = q[None, :]
    x = vectors
    if x.dtype != np.float16 or not x.flags.c_contiguous:
        raise TypeError("vectors must be a C-contiguous float16 array")
    nq, d = q.shape
    if x.ndim != 2 or x.shape[1] != d:
        raise ValueError(f"queries have dimension {d}, vectors {x.shape}")
    if k < 1:
        raise ValueError("k must be >= 1")
    r = None if rows is None else np.ascontiguousarray(rows, dtype=np.int64)
    out_s = np.empty((nq, k), np.float32)
    out_r = np.empty((nq, k), np.int64)
    heap_s = np.empty((nq, k), np.float32)
    heap_r = np.empty((nq, k), np.int64)
    scratch = np.empty(d, np.float32)
    done = _lib.gk_scan(_ptr(q), nq, d, _ptr(x), x.shape[0], _ptr(_words(allow)), _ptr(r),
                        0 if r is None else r.shape[0], METRICS[metric], k, _ptr(out_s), _ptr(out_r),
                        _ptr(heap_s), _ptr(heap_r), _ptr(scratch))
    if done < 0:
        raise MemoryError("gk_scan: out of memory")
    return out_s, out_r


def ivf_scan(query: np.ndarray, vectors: np.ndarray, offsets: np.ndarray, order: np.ndarray, k: int,
             min_lists: int, min_allowed: int = 0, max_rows: int = 0, allow: np.ndarray | None = None,
             metric: str = "ip", density: float = 0.0, boost: int = 1, bound: np.ndarray | None = None
             ) -> tuple[np.ndarray, np.ndarray, int, int]:
    """IVF top-k of one query over ``vectors`` grouped by list (list l = rows offsets[l]:offsets[l + 1]),
    probing lists in ``order`` (best first): at least ``min_lists``, and on until ``min_allowed`` allowed
    rows were scored (or ``max_rows`` visited); ``min_allowed`` grows ``boost``-fold when the first lists
    held fewer than ``density`` allowed rows per row visited. With ``bound`` (float32, one estimate per list
    of the best score its rows can reach; ``order`` must then rank lists by it), the scan also stops, after
    ``min_lists``, at the first list estimated below the k-th score held. Returns (scores (k,), rows (k,),
    lists probed, rows scored)."""
    q = np.ascontiguousarray(query, dtype=np.float32).reshape(-1)
    d = q.shape[0]
    out_s = np.empty(k, np.float32)
    out_r = np.empty(k, np.int64)
    heap_s = np.empty(k, np.float32)
    heap_r = np.empty(k, np.int64)
    scratch = np.empty(d, np.float32)
    stats = np.zeros(3, np.int64)
    o = np.ascontiguousarray(order, dtype=np.int64)
    b = None
    if bound is not None:
        b = np.ascontiguousarray(bound, dtype=np.float32)
        if b.shape != (offsets.shape[0] - 1,):
            raise ValueError(f"bound has shape {b.shape}, want one value per list ({offsets.shape[0] - 1})")
    scored = _lib.gk_ivf(_ptr(q), d, _ptr(vectors), vectors.shape[0], _ptr(offsets), _ptr(o), o.shape[0], min_lists,
                         min_allowed, max_rows, _ptr(_words(allow)), density, boost, _ptr(b), METRICS[metric], k,
                         _ptr(out_s), _ptr(out_r), _ptr(heap_s), _ptr(heap_r), _ptr(scratch), _ptr(stats))
    return out_s, out_r, int(stats[0]), int(scored)


def bits_to_rows(bitmap: np.ndarray, n: int) -> np.ndarray:
    """The rows (< n) whose bit is set, ascending."""
    words = _words(bitmap)
    out = np.empty(min(n, words.shape[0] * 64), np.int64)
    m = _lib.gk_bits_to_rows(_ptr(words), words.shape[0], n, _ptr(out))
    return out[:m]


def rows_f32(vectors: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """``vectors[rows]`` (FP16, C-contiguous, n x d) as float32 (len(rows), d); rows must be in 0..n-1."""
    if vectors.dtype != np.float16 or not vectors.flags.c_contiguous or vectors.ndim != 2:
        raise TypeError("vectors must be a C-contiguous 2-d float16 array")
    r = np.ascontiguousarray(rows, dtype=np.int64)
    if r.shape[0] and (int(r.min()) < 0 or int(r.max()) >= vectors.shape[0]):
        raise IndexError(f"rows must be in 0..{vectors.shape[0] - 1}")
    out = np.empty((r.shape[0], vectors.shape[1]), np.float32)
    if r.shape[0]:
        _lib.gk_rows_f32(_ptr(vectors), vectors.shape[1], _ptr(r), r.shape[0], _ptr(out))
    return out


class Graph:
    """A faiss HNSW graph seen from C: zero-copy views of its arrays (valid while the index lives)."""

    def __init__(self, neighbors: np.ndarray, offsets: np.ndarray, cum: np.ndarray, entry: int, max_level: int,
                 n: int) -> None:
        self.neighbors = np.ascontiguousarray(neighbors, dtype=np.int32)
        self.offsets = np.ascontiguousarray(offsets, dtype=np.uint64)
        self.cum = np.ascontiguousarray(cum, dtype=np.int32)
        self.entry = int(entry)
        self.max_level = int(max_level)
        self.n = int(n)
        self._local = threading.local()

    def _visited(self) -> tuple[np.ndarray, int]:
        state = getattr(self._local, "state", None)
        if state is None or state[0].shape[0] < self.n:
            state = [np.zeros(self.n, np.uint32), 0]
            self._local.state = state
        state[1] += 1
        if state[1] >= 0xFFFFFFFF:
            state[0][:] = 0
            state[1] = 1
        return state[0], state[1]

    def search(self, query: np.ndarray, vectors: np.ndarray, k: int, ef: int, allow: np.ndarray | None,
               metric: str = "ip", max_bridge: int = 0) -> tuple[np.ndarray, np.ndarray, int]:
        """Filtered top-k of one query; returns (scores (k,), rows (k,), rows scored)."""
        q = np.ascontiguousarray(query, dtype=np.float32).reshape(-1)
        d = q.shape[0]
        ef = max(ef, k)
        out_s = np.empty(k, np.float32)
        out_r = np.empty(k, np.int64)
        heap_s = np.empty(ef, np.float32)
        heap_r = np.empty(ef, np.int64)
        scratch = np.empty(d, np.float32)
        stats = np.zeros(2, np.int64)
        visited, epoch = self._visited()
        found = _lib.gk_acorn(_ptr(q), d, _ptr(vectors), self.n, _ptr(self.neighbors), _ptr(self.offsets),
                              _ptr(self.cum), self.entry, self.max_level, _ptr(_words(allow)), ef, k,
                              METRICS[metric], max_bridge, _ptr(visited), epoch, _ptr(out_s), _ptr(out_r),
                              _ptr(heap_s), _ptr(heap_r), _ptr(scratch), _ptr(stats))
        if found < 0:
            raise MemoryError("gk_acorn: out of memory")
        return out_s, out_r, int(stats[0])
