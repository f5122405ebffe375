"""CAGRA on an NVIDIA GPU (cuVS) for the sealed segment, with GPU brute force beside it.

- The segment's rows live on the device as FP16; the CAGRA graph and a brute-force index share them.
- Build/search parameters come from :class:`~gmco_shard.index.params.CagraParams` (settings
  ``GMCO_SHARD_CAGRA_*``); a request's ``ef`` overrides ``itopk_size``.
- The store's allow mask becomes a cuVS bitset pre-filter (``filters.from_bitset``). The store calls
  :meth:`CagraIndex.exact_search` (GPU brute force over the allowed rows) instead of its CPU exact path
  when few rows pass the filter; segments too small for a graph are searched by brute force too.
- All device memory comes from one rmm pool sized by ``GMCO_SHARD_GPU_POOL_BYTES`` or
  ``GMCO_SHARD_GPU_POOL_FRACTION`` (CuPy allocates from it as well). A load whose rows cannot fit is
  refused before touching the device; an allocation that fails anyway raises ResourceExhausted.
- Snapshots keep only the graph (``cagra_graph.npy``): the rows are already in the shard snapshot, and
  ``cagra.from_graph`` reattaches them on load, so a restart does not rebuild.
- Each calling thread gets its own CUDA stream and cuVS resources, so concurrent searches overlap.

This module imports CuPy, cuVS and rmm at the top on purpose: the index registry turns the ImportError
into "install the shard's gpu extra", and CPU installs never import it.

UNVERIFIED on a GPU where it was written (none was lent): see docs/gpu.md for what remains to run.
"""

from __future__ import annotations

import json
import logging
import threading
import time
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import cupy as cp
import numpy as np
import rmm
from cuvs.common import Resources
from cuvs.neighbors import brute_force, cagra, filters
from gmco_common.errors import ResourceExhausted
from rmm.allocators.cupy import rmm_cupy_allocator

from gmco_shard import bitmaps
from gmco_shard.index.base import VectorIndex
from gmco_shard.index.cuvs_support import bitset, check_fits, is_out_of_memory
from gmco_shard.index.params import CagraParams

log = logging.getLogger(__name__)

_GRAPH = "cagra_graph.npy"
_META = "cagra.json"
# cuVS returns this distance for result slots no allowed row could fill.
_EMPTY_DISTANCE = 3.0e38


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
            _, total = cp.cuda.runtime.memGetInfo()
            size = params.pool_size(total)
            rmm.reinitialize(pool_allocator=True, initial_pool_size=size, maximum_pool_size=size, devices=device)
            cp.cuda.set_allocator(rmm_cupy_allocator)
            self.size = size
            log.info("rmm pool of %.2f GiB on device %d (%.2f GiB total)", size / 2**30, device, total / 2**30)

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


@contextmanager
def _device_errors(what: str) -> Iterator[None]:
    """Out-of-memory from rmm/CuPy/cuVS becomes ResourceExhausted; anything else propagates unchanged."""
    try:
        yield
    except Exception as exc:
        if is_out_of_memory(exc):
            raise ResourceExhausted(f"GPU memory exhausted {what}; send smaller batches, raise "
                                    "GMCO_SHARD_GPU_POOL_BYTES, or spread the slots over more shards") from exc
        raise


class CagraIndex(VectorIndex):
    name = "cuvs"

    def __init__(self, dim, params) -> None:
        super().__init__(dim, params)
        self.cagra = params.cagra
        _POOL.ensure(self.cagra)
        self._metric = "inner_product" if params.metric == "ip" else "sqeuclidean"
        self._local = threading.local()
        self._dataset: cp.ndarray | None = None
        self._graph: cp.ndarray | None = None  # kept alive: the CAGRA index may reference it
        self._index: cagra.Index | None = None
        self._bf: brute_force.Index | None = None
        self._held: weakref.finalize | None = None

    # -- device placement ---------------------------------------------------------------------
    def _resources(self) -> tuple[cp.cuda.Stream, Resources]:
        """This thread's CUDA stream and the cuVS resources bound to it."""
        local = self._local
        if not hasattr(local, "res"):
            local.stream = cp.cuda.Stream(non_blocking=False)
            local.res = Resources(stream=local.stream.ptr)
        return local.stream, local.res

    def _upload(self, vectors: np.ndarray, building: bool) -> None:
        """Put the segment's rows on the device (refusing what cannot fit) and index them for brute force."""
        rows = vectors.shape[0]
        if self._held is not None:  # a rebuild replaces this index's rows
            self._held()
            self._dataset = self._bf = None
        check_fits(self.cagra.device_bytes(rows, self.dim, building), _POOL.free, rows)
        stream, res = self._resources()
        with stream, _device_errors(f"placing {rows} rows on the device"):
            self._dataset = cp.asarray(np.ascontiguousarray(vectors, dtype=np.float16))
            self._bf = brute_force.build(self._dataset, metric=self._metric, resources=res)
            stream.synchronize()
        self._held = _POOL.hold(self, self.cagra.device_bytes(rows, self.dim, building=False))
        self.count = rows

    def _has_graph(self, rows: int) -> bool:
        # CAGRA needs more rows than the intermediate graph's degree; smaller segments use brute force.
        return rows > self.cagra.intermediate_graph_degree

    # -- VectorIndex ----------------------------------------------------------------------------
    def build(self, vectors: np.ndarray, progress: bool = False) -> None:
        self._index = self._graph = None
        self._upload(vectors, building=True)
        if not self._has_graph(self.count):
            return
        stream, res = self._resources()
        ip = cagra.IndexParams(metric=self._metric, graph_degree=self.cagra.graph_degree,
                               intermediate_graph_degree=self.cagra.intermediate_graph_degree,
                               build_algo=self.cagra.build_algo)
        start = time.perf_counter()
        with stream, _device_errors(f"building CAGRA over {self.count} rows"):
            self._index = cagra.build(ip, self._dataset, resources=res)
            stream.synchronize()
        log.info("CAGRA built over %d rows in %.1f s (graph_degree %d)", self.count, time.perf_counter() - start,
                 self.cagra.graph_degree)

    def search(self, queries, k, allow=None, ef=0):
        if self._index is None:
            return self.exact_search(queries, k, allow)
        sp = cagra.SearchParams(itopk_size=self.cagra.itopk_for(k, ef), search_width=self.cagra.search_width,
                                num_random_samplings=self.cagra.num_random_samplings)
        stream, res = self._resources()
        with stream, _device_errors(f"searching {len(queries)} queries"):
            q = cp.asarray(np.ascontiguousarray(queries, dtype=np.float16))
            dist = cp.empty((q.shape[0], k), cp.float32)
            rows = cp.empty((q.shape[0], k), cp.uint32)
            pre = None if allow is None else filters.from_bitset(cp.asarray(bitset(allow, self.count)))
            cagra.search(sp, self._index, q, k, neighbors=rows, distances=dist, resources=res, filter=pre)
            return self._finish(stream, dist, rows, allow)

    def exact_search(self, queries: np.ndarray, k: int,
                     allow: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """GPU brute force over the device rows (only the allowed ones when ``allow`` is given)."""
        stream, res = self._resources()
        with stream, _device_errors(f"brute-force searching {len(queries)} queries"):
            q = cp.asarray(np.ascontiguousarray(queries, dtype=np.float16))
            dist = cp.empty((q.shape[0], k), cp.float32)
            rows = cp.empty((q.shape[0], k), cp.int64)
            pre = None if allow is None else filters.from_bitset(cp.asarray(bitset(allow, self.count)))
            brute_force.search(self._bf, q, k, neighbors=rows, distances=dist, resources=res, prefilter=pre)
            return self._finish(stream, dist, rows, allow)

    def _finish(self, stream: cp.cuda.Stream, dist: cp.ndarray, rows: cp.ndarray,
                allow: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
        """Host (scores, rows) in the interface's convention: higher is better, empty slots (-inf, -1)."""
        d = cp.asnumpy(dist)
        r = cp.asnumpy(rows).astype(np.int64)
        stream.synchronize()
        bad = (r < 0) | (r >= self.count) | ~np.isfinite(d) | (np.abs(d) >= _EMPTY_DISTANCE)
        if allow is not None:  # never hand out a row the filter excluded, whatever fills an empty slot
            allowed = bitmaps.to_bools(allow, self.count)
            bad |= ~allowed[np.clip(r, 0, max(self.count - 1, 0))]
        scores = d if self._metric == "inner_product" else -d
        scores[bad] = -np.inf
        r[bad] = -1
        return scores.astype(np.float32, copy=False), r

    def save(self, directory: Path) -> None:
        if self._index is None:
            return
        stream, _ = self._resources()
        with stream:
            graph = cp.asnumpy(cp.asarray(self._index.graph))
            stream.synchronize()
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
        self._index = None
        self._upload(vectors, building=False)
        stream, res = self._resources()
        with stream, _device_errors(f"loading the CAGRA graph of {rows} rows"):
            self._graph = cp.asarray(np.load(directory / _GRAPH).astype(np.uint32, copy=False))
            self._index = cagra.from_graph(self._graph, self._dataset, metric=self._metric, resources=res)
            stream.synchronize()

    @property
    def nbytes(self) -> int:
        """Device bytes of the segment: FP16 rows plus the graph."""
        return self.cagra.device_bytes(self.count, self.dim, building=False)
