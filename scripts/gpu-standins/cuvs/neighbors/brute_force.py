"""Stand-in of ``cuvs.neighbors.brute_force`` 26.10 (neighbors int64)."""

from __future__ import annotations

import numpy as np

from cuvs.common import auto_sync_resources
from cuvs.neighbors import filters
from cuvs.neighbors._standin import check_k, device, exact, metric_ok


class Index:
    def __init__(self) -> None:
        self.trained = False


@auto_sync_resources
def build(dataset, metric="sqeuclidean", metric_arg=2.0, resources=None) -> Index:
    idx = Index()
    idx._dataset = device(dataset, "dataset", ("float32", "float16"))
    idx.metric, idx.trained = metric_ok(metric), True
    return idx


@auto_sync_resources
def search(index: Index, queries, k, neighbors=None, distances=None, resources=None, prefilter=None):
    import cupy

    if not index.trained:
        raise ValueError("Index needs to be built before calling search.")
    q = device(queries, "queries", ("float32", "float16"), cols=index._dataset.shape[1])
    check_k(k, index._dataset.shape[0])
    nq = q.shape[0]
    if neighbors is None:
        neighbors = cupy.empty((nq, k), dtype=np.int64)
    if distances is None:
        distances = cupy.empty((nq, k), dtype=np.float32)
    out_r = device(neighbors, "neighbors", ("int64",), rows=nq, cols=k)
    out_d = device(distances, "distances", ("float32",), rows=nq, cols=k)
    d, r = exact(index._dataset, q, k, index.metric, (prefilter or filters.no_filter()).allowed(
        index._dataset.shape[0]))
    out_d[...], out_r[...] = d, r
    return distances, neighbors
