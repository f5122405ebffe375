"""Vectors on the wire: raw little-endian bytes plus dtype and dimension.

Decoding validates everything a caller can get wrong and raises :class:`InvalidArgument` naming the
field, so that a bad vector never reaches numpy, faiss or a GPU.
"""

from __future__ import annotations

import numpy as np
from gmco.common.v1 import common_pb2

from gmco_common.errors import InvalidArgument

_DTYPES = {
    common_pb2.D_TYPE_FLOAT16: np.dtype("<f2"),
    common_pb2.D_TYPE_FLOAT32: np.dtype("<f4"),
}
_PB_DTYPE = {np.dtype("float16"): common_pb2.D_TYPE_FLOAT16, np.dtype("float32"): common_pb2.D_TYPE_FLOAT32}


def _dtype(value: int, field: str) -> np.dtype:
    try:
        return _DTYPES[value]
    except KeyError:
        raise InvalidArgument(f"{field}.dtype", f"unsupported dtype {value}; use D_TYPE_FLOAT16 or D_TYPE_FLOAT32") from None


def _check(arr: np.ndarray, field: str) -> np.ndarray:
    if not np.isfinite(arr).all():
        raise InvalidArgument(field, "contains NaN or Inf")
    return arr


def decode_vector(vec: common_pb2.Vector, field: str, expected_dim: int | None = None) -> np.ndarray:
    """One vector as a 1-D read-only array of its wire dtype."""
    dtype = _dtype(vec.dtype, field)
    if vec.dimension == 0:
        raise InvalidArgument(f"{field}.dimension", "must be > 0")
    if expected_dim is not None and vec.dimension != expected_dim:
        raise InvalidArgument(f"{field}.dimension", f"is {vec.dimension}, expected {expected_dim}")
    want = vec.dimension * dtype.itemsize
    if len(vec.data) != want:
        raise InvalidArgument(
            f"{field}.data", f"has {len(vec.data)} bytes; dimension {vec.dimension} x {dtype.name} needs {want}"
        )
    return _check(np.frombuffer(vec.data, dtype=dtype), field)


def decode_batch(batch: common_pb2.VectorBatch, field: str, expected_dim: int | None = None) -> np.ndarray:
    """A batch as a 2-D read-only array (count x dimension) of its wire dtype."""
    dtype = _dtype(batch.dtype, field)
    if batch.count == 0:
        raise InvalidArgument(f"{field}.count", "the batch is empty")
    if batch.dimension == 0:
        raise InvalidArgument(f"{field}.dimension", "must be > 0")
    if expected_dim is not None and batch.dimension != expected_dim:
        raise InvalidArgument(f"{field}.dimension", f"is {batch.dimension}, expected {expected_dim}")
    want = batch.count * batch.dimension * dtype.itemsize
    if len(batch.data) != want:
        raise InvalidArgument(
            f"{field}.data",
            f"has {len(batch.data)} bytes; {batch.count} x {batch.dimension} x {dtype.name} needs {want}",
        )
    arr = np.frombuffer(batch.data, dtype=dtype).reshape(batch.count, batch.dimension)
    return _check(arr, field)


_FP16_MAX = float(np.finfo(np.float16).max)


def as_fp16(arr: np.ndarray, field: str) -> np.ndarray:
    """``arr`` as float16 (the storage type of every embedding); INVALID_ARGUMENT when a value would overflow."""
    if arr.dtype != np.float16 and np.abs(arr).max(initial=0) > _FP16_MAX:
        raise InvalidArgument(field, "has values beyond the float16 range (storage is FP16)")
    return arr.astype("<f2", copy=False)


def encode_vector(arr: np.ndarray, dtype: str = "float16") -> common_pb2.Vector:
    a = np.ascontiguousarray(arr, dtype=np.dtype(dtype).newbyteorder("<")).reshape(-1)
    return common_pb2.Vector(data=a.tobytes(), dtype=_PB_DTYPE[np.dtype(dtype)], dimension=a.shape[0])


def encode_batch(arr: np.ndarray, dtype: str = "float16") -> common_pb2.VectorBatch:
    a = np.ascontiguousarray(np.atleast_2d(arr), dtype=np.dtype(dtype).newbyteorder("<"))
    return common_pb2.VectorBatch(
        data=a.tobytes(), dtype=_PB_DTYPE[np.dtype(dtype)], dimension=a.shape[1], count=a.shape[0]
    )


def normalize(arr: np.ndarray) -> np.ndarray:
    """Rows scaled to unit L2 norm (float32); zero rows stay zero."""
    a = np.asarray(arr, dtype=np.float32)
    norms = np.linalg.norm(a, axis=-1, keepdims=True)
    return a / np.where(norms == 0, 1.0, norms)
