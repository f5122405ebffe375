"""Stand-in of ``cuvs.neighbors.cagra`` 26.10: the same signatures and input checks; exact results."""

from __future__ import annotations

import numpy as np

from cuvs.common import CuvsException, auto_sync_resources
from cuvs.neighbors import filters
from cuvs.neighbors._standin import check_k, device, exact, metric_ok

_DATA = ("float32", "float16", "int8", "uint8")
BUILD_ALGOS = ("ivf_pq", "nn_descent", "iterative_cagra_search", "ace")


class IndexParams:
    def __init__(self, *, metric="sqeuclidean", intermediate_graph_degree=128, graph_degree=64, build_algo="ivf_pq",
                 nn_descent_niter=20, ivf_pq_build_params=None, ivf_pq_search_params=None, ace_params=None,
                 refinement_rate: float = 1.0) -> None:
        self.metric = metric_ok(metric)
        if build_algo not in BUILD_ALGOS:
            raise ValueError(f"Unknown build_algo '{build_algo}'")
        self.intermediate_graph_degree, self.graph_degree, self.build_algo = (intermediate_graph_degree,
                                                                               graph_degree, build_algo)


class SearchParams:
    def __init__(self, *, max_queries=0, itopk_size=64, max_iterations=0, algo="auto", team_size=0, search_width=1,
                 min_iterations=0, thread_block_size=0, hashmap_mode="auto", hashmap_min_bitlen=0,
                 hashmap_max_fill_rate=0.5, num_random_samplings=1, rand_xor_mask=0x128394, persistent=False,
                 persistent_lifetime=None, persistent_device_usage=None) -> None:
        self.itopk_size, self.search_width, self.num_random_samplings = itopk_size, search_width, num_random_samplings


class DeviceTensorView:
    """``__cuda_array_interface__`` over memory the index owns."""

    def __init__(self, array) -> None:
        self._standin_array = array

    @property
    def __cuda_array_interface__(self) -> dict:
        return self._standin_array.__cuda_array_interface__

    @property
    def shape(self):
        return self._standin_array.shape

    def copy_to_host(self, resources=None) -> np.ndarray:
        return self._standin_array.get()


class Index:
    def __init__(self) -> None:
        self.trained = False
        self._dataset: np.ndarray | None = None
        self._graph = None
        self.metric = "sqeuclidean"

    @property
    def dim(self) -> int:
        return self._dataset.shape[1]

    @property
    def graph_degree(self) -> int:
        return self._graph.shape[1]

    def __len__(self) -> int:
        return self._dataset.shape[0]

    @property
    def graph(self) -> DeviceTensorView:
        if not self.trained:
            raise ValueError("Index needs to be built before getting graph")
        return DeviceTensorView(self._graph)


@auto_sync_resources
def build(index_params: IndexParams, dataset, resources=None) -> Index:
    import cupy

    data = device(dataset, "dataset", _DATA, host_ok=True)
    n = data.shape[0]
    if n <= index_params.intermediate_graph_degree:
        raise CuvsException(f"stand-in: {n} rows are too few for an intermediate graph degree of "
                            f"{index_params.intermediate_graph_degree}")
    rng = np.random.default_rng(n)
    idx = Index()
    idx._dataset = data
    idx._graph = cupy.asarray(rng.integers(0, n, (n, index_params.graph_degree), dtype=np.uint32))
    idx.metric = index_params.metric
    idx.trained = True
    return idx


@auto_sync_resources
def from_graph(graph, dataset, metric="sqeuclidean", resources=None) -> Index:
    data = device(dataset, "dataset", _DATA, host_ok=True)
    g = device(graph, "graph", ("uint32",), host_ok=True)
    if g.shape[0] != data.shape[0]:
        raise CuvsException(f"graph has {g.shape[0]} rows, the dataset {data.shape[0]}")
    idx = Index()
    idx._dataset, idx._graph, idx.metric, idx.trained = data, graph, metric_ok(metric), True
    return idx


@auto_sync_resources
def search(search_params: SearchParams, index: Index, queries, k, neighbors=None, distances=None, resources=None,
           filter=None):
    import cupy

    if not index.trained:
        raise ValueError("Index needs to be built before calling search.")
    q = device(queries, "queries", _DATA, cols=index.dim)
    if q.dtype != index._dataset.dtype:
        raise CuvsException(f"queries are {q.dtype}, the index {index._dataset.dtype}")
    if search_params.itopk_size < k:
        raise CuvsException(f"itopk_size {search_params.itopk_size} < k {k}")
    check_k(k, len(index))
    nq = q.shape[0]
    if neighbors is None:
        neighbors = cupy.empty((nq, k), dtype=np.uint32)
    if distances is None:
        distances = cupy.empty((nq, k), dtype=np.float32)
    out_r = device(neighbors, "neighbors", ("uint32",), rows=nq, cols=k)
    out_d = device(distances, "distances", ("float32",), rows=nq, cols=k)
    allowed = (filter or filters.no_filter()).allowed(len(index))
    d, r = exact(index._dataset, q, k, index.metric, allowed)
    out_d[...] = d
    out_r[...] = np.where(r < 0, np.uint32(0xFFFFFFFF), r).astype(np.uint32)
    return distances, neighbors
