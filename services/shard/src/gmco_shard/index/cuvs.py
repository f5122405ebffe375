"""CAGRA on an NVIDIA GPU (cuVS) for the sealed segment; its exact searches run on the same rows with CuPy.

- The segment's rows live on the device once, as FP16 (a :class:`~gmco_shard.index.cupy.DeviceRows`); the
  CAGRA graph is built over a view of them. Exact searches (the store's EXACT path for selective filters,
  segments too small for a graph, ``k`` at or above the row count, which CAGRA is never asked) are the
  ``cupy`` backend's exact search over those rows: no brute-force index, no second copy.
- CAGRA's results are rescored in FP32 from the FP16 rows before they leave the device, so a sealed
  segment's scores are exactly what the CPU kernels and the exact path give, and segments merge cleanly.
- Build/search parameters come from :class:`~gmco_shard.index.params.CagraParams` (``GMCO_SHARD_CAGRA_*``);
  a request's ``ef`` overrides ``itopk_size``. The allow bitmap is the cuVS bitset pre-filter as it is
  (``cuvs_support.bitset``: the same bytes as uint32 words).
- **Streams.** Each thread has its own cuVS ``Resources()``, made without a stream: 26.10's
  ``Resources(stream=...)`` casts the untyped Python object to ``cudaStream_t`` and so hands cuVS the
  object's address (NVIDIA/cuvs#1863). Without one, cuVS keeps raft's default, ``cudaStreamPerThread``, and
  the CuPy work runs under ``cupy.cuda.Stream.ptds``: the same per-thread stream, so the two are ordered
  without any synchronisation, and threads overlap.
- All device memory comes from one rmm pool, sized at start from the device's **free** memory
  (``GMCO_SHARD_GPU_POOL_FRACTION``) or ``GMCO_SHARD_GPU_POOL_BYTES``; CuPy allocates from it too. A load
  whose rows cannot fit is refused before touching the device; an allocation that fails anyway raises
  ResourceExhausted.
- Snapshots keep only the graph (``cagra_graph.npy``): the rows are in the shard snapshot, and
  ``cagra.from_graph`` reattaches them on load, so a restart does not rebuild.

This module imports CuPy, cuVS and rmm at the top on purpose: the index registry turns a missing package
into "install the shard's gpu extra", and a library that is there but cannot load (libcuvs.so needs
nvJitLink >= 13.3 and the CUDA libraries on the loader's path) into the loader's own message with what
to do (``cuvs_support.explain_load_error``). CPU installs never import it.

UNVERIFIED on a GPU where it was written (none was lent): CPU stand-ins of the 26.10 APIs ran it
(docs/gpu.md says what remains to run).
"""

from __future__ import annotations

import json
import logging
import threading
import time
import weakref
from pathlib import Path

import cupy as cp
import numpy as np

from gmco_shard.index.cuvs_support import load_error

try:
    import cuvs
    import rmm
    from cuvs.common import Resources
    from cuvs.neighbors import cagra, filters
    from rmm.allocators.cupy import rmm_cupy_allocator
except ImportError as _exc:
    raise load_error(_exc) from _exc
except (OSError, RuntimeError) as _exc:  # a library loader gave up (cuda.pathfinder's DynamicLibNotFoundError)
    raise load_error(ImportError(f"{type(_exc).__name__}: {_exc}")) from _exc

from gmco_shard.index.base import VectorIndex
from gmco_shard.index.cupy import DeviceRows, device_errors, device_name
from gmco_shard.index.cuvs_support import bitset, check_fits
from gmco_shard.index.params import CagraParams

log = logging.getLogger(__name__)

_GRAPH = "cagra_graph.npy"
_META = "cagra.json"
# cuVS returns this distance (or its negation) for result slots no allowed row could fill.
_EMPTY_DISTANCE = 3.0e38
_logged = threading.Event()


class _DevicePool:
    """The process-wide rmm pool (created once) and the bytes held by live indexes, for refusing loads."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.size = 0
        self.resident = 0

    def ensure(self, params: CagraParams) -> None:
        with self._lock:
            if self.size:
                return
            device = cp.cuda.runtime.getDevice()
            free, total = cp.cuda.runtime.memGetInfo()
            size = params.pool_size(free)
            rmm.reinitialize(pool_allocator=True, initial_pool_size=size, maximum_pool_size=size, devices=device)
            cp.cuda.set_allocator(rmm_cupy_allocator)
            self.size = size
            log.info("rmm pool of %.2f GiB on device %d (%.2f GiB free of %.2f GiB)", size / 2**30, device,
                     free / 2**30, total / 2**30)

    def hold(self, owner: object, nbytes: int) -> weakref.finalize:
        """Count ``nbytes`` as resident until ``owner`` is collected or the returned finalizer is called."""
        with self._lock:
            self.resident += nbytes
        return weakref.finalize(owner, self._release, nbytes)

    def _release(self, nbytes: int) -> None:
        with self._lock:
            self.resident -= nbytes

    @property
    def free(self) -> int:
        return self.size - self.resident


_POOL = _DevicePool()


class CagraIndex(VectorIndex):
    name = "cuvs"
    on_gpu = True

    def __init__(self, dim, params) -> None:
        super().__init__(dim, params)
        self.cagra = params.cagra
        _POOL.ensure(self.cagra)
        self._metric = "inner_product" if params.metric == "ip" else "sqeuclidean"
        self._local = threading.local()
        self._rows: DeviceRows | None = None
        self._graph: cp.ndarray | None = None  # kept alive: the CAGRA index made by from_graph references it
        self._index: cagra.Index | None = None
        self._held: weakref.finalize | None = None
        if not _logged.is_set():
            _logged.set()
            log.info("index backend cuvs: CAGRA with cuVS %s on %s; exact searches with CuPy %s",
                     getattr(cuvs, "__version__", "?"), device_name(), cp.__version__)

    # -- device placement ---------------------------------------------------------------------
    def _resources(self) -> Resources:
        """This thread's cuVS resources, on cuVS's default stream (cudaStreamPerThread): never pass
        ``stream=`` (see the module docstring)."""
        res = getattr(self._local, "res", None)
        if res is None:
            res = self._local.res = Resources()
        return res

    def _dataset(self) -> cp.ndarray:
        """CAGRA's view of the device rows (the padding rows excluded)."""
        assert self._rows is not None
        return self._rows.x[: self.count]

    def _free(self) -> None:
        self._index = self._graph = self._rows = None
        if self._held is not None:
            self._held()
            self._held = None

    def _upload(self, vectors: np.ndarray, building: bool) -> None:
        """Put the segment's rows on the device, refusing what cannot fit."""
        rows = vectors.shape[0]
        self._free()  # a rebuild replaces this index's rows
        check_fits(self.cagra.device_bytes(rows, self.dim, building), _POOL.free, rows)
        with cp.cuda.Stream.ptds, device_errors(f"placing {rows} rows on the device"):
            self._rows = DeviceRows(vectors, self.params.metric)
            cp.cuda.Stream.ptds.synchronize()
        self._held = _POOL.hold(self, self.cagra.device_bytes(rows, self.dim, building=False))
        self.count = rows

    def _has_graph(self, rows: int) -> bool:
        # CAGRA needs more rows than the intermediate graph's degree; smaller segments are searched exactly.
        return rows > self.cagra.intermediate_graph_degree

    # -- VectorIndex ----------------------------------------------------------------------------
    def build(self, vectors: np.ndarray, progress: bool = False) -> None:
        self._upload(vectors, building=True)
        if not self._has_graph(self.count):
            return
        ip = cagra.IndexParams(metric=self._metric, graph_degree=self.cagra.graph_degree,
                               intermediate_graph_degree=self.cagra.intermediate_graph_degree,
                               build_algo=self.cagra.build_algo)
        res = self._resources()
        start = time.perf_counter()
        with cp.cuda.Stream.ptds, device_errors(f"building CAGRA over {self.count} rows"):
            self._index = cagra.build(ip, self._dataset(), resources=res)
            res.sync()
        log.info("CAGRA built over %d rows in %.1f s (graph_degree %d)", self.count, time.perf_counter() - start,
                 self.cagra.graph_degree)

    def search(self, queries, k, allow=None, ef=0):
        if self._index is None or k >= self.count:  # no graph, or every row wanted: exact
            return self.exact_search(queries, k, allow)
        rows_dev = self._rows
        assert rows_dev is not None
        q32 = np.ascontiguousarray(queries, dtype=np.float32)
        nq = q32.shape[0]
        sp = cagra.SearchParams(itopk_size=self.cagra.itopk_for(k, ef), search_width=self.cagra.search_width,
                                num_random_samplings=self.cagra.num_random_samplings)
        res = self._resources()
        with cp.cuda.Stream.ptds, device_errors(f"searching {nq} queries"):
            q = cp.asarray(q32.astype(np.float16))
            dist = cp.empty((nq, k), dtype=cp.float32)
            rows = cp.empty((nq, k), dtype=cp.uint32)
            pre = None
            valid_rows = None
            if allow is not None:
                words = rows_dev.clean_words(allow)
                pre = filters.from_bitset(cp.asarray(bitset(words, self.count)))
                valid_rows = rows_dev.allowed_rows(words)
            cagra.search(sp, self._index, q, k, neighbors=rows, distances=dist, resources=res, filter=pre)
            r = rows.astype(cp.int64)
            valid = (r < self.count) & (cp.abs(dist) < _EMPTY_DISTANCE)
            if valid_rows is not None:  # never hand out a row the filter excluded, whatever fills a slot
                valid &= valid_rows[cp.minimum(r, self.count - 1)]
            s, r = rows_dev.rescore(q32, r, valid, k)
            return cp.asnumpy(s), cp.asnumpy(r)

    def exact_search(self, queries: np.ndarray, k: int,
                     allow: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Exact top-k on the device rows (only the allowed ones when ``allow`` is given): the CuPy path."""
        if self._rows is None:
            q = np.asarray(queries).shape[0]
            return np.full((q, k), -np.inf, np.float32), np.full((q, k), -1, np.int64)
        with device_errors(f"searching {len(queries)} queries exactly"):
            return self._rows.search(queries, k, allow)

    def save(self, directory: Path) -> None:
        if self._index is None:
            return
        with cp.cuda.Stream.ptds:
            graph = cp.asnumpy(cp.asarray(self._index.graph))
        np.save(directory / _GRAPH, graph)
        meta = {"rows": self.count, "dim": self.dim, "metric": self._metric, "graph_degree": int(graph.shape[1])}
        (directory / _META).write_text(json.dumps(meta))

    def load(self, directory: Path, vectors: np.ndarray | None) -> None:
        assert vectors is not None
        rows = vectors.shape[0]
        if not self._has_graph(rows):
            self.build(vectors)
            return
        expected = {"rows": rows, "dim": self.dim, "metric": self._metric}
        meta_file = directory / _META
        meta = json.loads(meta_file.read_text()) if meta_file.is_file() else {}
        if any(meta.get(key) != value for key, value in expected.items()) or not (directory / _GRAPH).is_file():
            log.warning("snapshot %s has no usable CAGRA graph for %d rows (%s); rebuilding", directory, rows, meta)
            self.build(vectors)
            return
        self._upload(vectors, building=False)
        res = self._resources()
        with cp.cuda.Stream.ptds, device_errors(f"loading the CAGRA graph of {rows} rows"):
            self._graph = cp.asarray(np.load(directory / _GRAPH).astype(np.uint32, copy=False))
            self._index = cagra.from_graph(self._graph, self._dataset(), metric=self._metric, resources=res)
            res.sync()

    def retire(self) -> None:
        """The segment was replaced: give its rows and graph back to the pool now."""
        self._free()

    @property
    def nbytes(self) -> int:
        """Device bytes of the segment: FP16 rows plus the graph."""
        return self.cagra.device_bytes(self.count, self.dim, building=False)

