"""What the cuVS stand-ins share: the input checks of 26.10's ``_check_input_array`` and an exact search."""

from __future__ import annotations

import numpy as np

from cuvs.common import CuvsException

FLT_MAX = np.float32(np.finfo(np.float32).max)
DISTANCE_TYPES = ("sqeuclidean", "inner_product", "euclidean", "cosine")


def device(x, name: str, dtypes: tuple[str, ...], rows: int | None = None, cols: int | None = None,
           host_ok: bool = False) -> np.ndarray:
    """The numpy array behind a device array, refused when cuVS would refuse it."""
    import cupy

    view = getattr(x, "_standin_array", None)
    if view is not None:
        x = view
    if isinstance(x, cupy.ndarray):
        a = x._a
    elif host_ok and isinstance(x, np.ndarray):
        a = x
    else:
        raise TypeError(f"{name}: expected a CUDA array interface compliant array, got {type(x)}")
    if a.dtype.name not in dtypes:
        raise TypeError(f"{name}: dtype {a.dtype} not supported (expected one of {', '.join(dtypes)})")
    if rows is not None and a.shape[0] != rows:
        raise ValueError(f"{name}: expected {rows} rows, got {a.shape[0]}")
    if cols is not None and (a.ndim != 2 or a.shape[1] != cols):
        raise ValueError(f"{name}: expected {cols} columns, got shape {a.shape}")
    return a


def metric_ok(metric: str) -> str:
    if metric not in DISTANCE_TYPES:
        raise KeyError(metric)
    return metric


def exact(dataset: np.ndarray, queries: np.ndarray, k: int, metric: str,
          allowed: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """(distances, rows) in cuVS's convention: inner product larger first, distances smaller first; empty
    slots hold row -1 and +/- FLT_MAX."""
    x = np.asarray(dataset, np.float32)
    q = np.asarray(queries, np.float32)
    ip = q @ x.T
    if metric == "inner_product":
        key = -ip
        dist = ip
    else:
        dist = (q * q).sum(1)[:, None] - 2 * ip + (x * x).sum(1)[None, :]
        if metric == "euclidean":
            dist = np.sqrt(np.maximum(dist, 0))
        key = dist
    if allowed is not None:
        key = np.where(allowed[None, :], key, np.inf)
    order = np.argsort(key, axis=1, kind="stable")[:, :k]
    rows = order.astype(np.int64)
    out = np.take_along_axis(dist, order, 1).astype(np.float32)
    empty = ~np.isfinite(np.take_along_axis(key, order, 1))
    if order.shape[1] < k:  # fewer rows than k
        pad = k - order.shape[1]
        rows = np.concatenate([rows, np.full((q.shape[0], pad), -1)], axis=1)
        out = np.concatenate([out, np.zeros((q.shape[0], pad), np.float32)], axis=1)
        empty = np.concatenate([empty, np.ones((q.shape[0], pad), bool)], axis=1)
    rows[empty] = -1
    out[empty] = -FLT_MAX if metric == "inner_product" else FLT_MAX
    return out, rows


def check_k(k: int, rows: int) -> None:
    if k > rows:
        raise CuvsException(f"stand-in: k={k} is above the index's {rows} rows; what 26.10 does then was never "
                            "seen (the API probe asks the real library), so the shard must not ask it")
