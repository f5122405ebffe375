"""What the cuVS backend decides without a GPU, so that it is unit-tested on CPU machines: whether a load
fits the memory pool, the allow-bitmap to cuVS bitset packing, and the recognition of out-of-memory errors
from rmm, CuPy and cuVS. (The CAGRA parameters themselves are ``index.params.CagraParams``.)
"""

from __future__ import annotations

import numpy as np
from gmco_common.errors import ResourceExhausted

ENV = "GMCO_SHARD_"


def check_fits(need: int, pool: int, rows: int) -> None:
    """Refuse a load that cannot fit in the pool, before touching the device."""
    if need > pool:
        raise ResourceExhausted(
            f"{rows} rows need at least {need / 2**30:.2f} GiB of GPU memory but the pool has {pool / 2**30:.2f} GiB; "
            f"raise {ENV}GPU_POOL_BYTES / {ENV}GPU_POOL_FRACTION, use a larger GPU, or spread the slots over more "
            "shards")


def bitset(allow: np.ndarray, n: int) -> np.ndarray:
    """The cuVS bitset of a row bitmap (``gmco_shard.bitmaps`` uint64 words) over ``n`` rows: uint32 words, bit
    ``i % 32`` of word ``i // 32`` set = row i allowed. The same bytes, so a view, cut to ceil(n / 32) words."""
    return np.ascontiguousarray(allow).view("<u4")[: (n + 31) // 32]


_OOM_MARKERS = ("out_of_memory", "out of memory", "bad_alloc", "cudaerrormemoryallocation", "maximum pool size exceeded")


def is_out_of_memory(exc: BaseException) -> bool:
    """True for device allocation failures: rmm/CuPy raise MemoryError, cuVS a CuvsException whose text names
    the failed allocation (``std::bad_alloc``, ``rmm::out_of_memory``, ``cudaErrorMemoryAllocation``)."""
    if isinstance(exc, MemoryError):
        return True
    text = str(exc).lower()
    return any(marker in text for marker in _OOM_MARKERS)
