"""The cuVS backend's parameters and the decisions around them, importable without a GPU.

Everything here is plain Python/numpy so that it is unit-tested on CPU machines:
the CAGRA build/search parameters and their validation, the rmm pool size, the device-memory
estimate used to refuse a load that cannot fit, the allow-mask to cuVS bitset packing, and the
recognition of out-of-memory errors from rmm, CuPy and cuVS.

Defaults are raised above cuVS's own (``itopk_size`` 64, ``search_width`` 1, ``num_random_samplings``
1), which users report give low recall from ~100k rows up: NVIDIA/cuvs#2102 measured ~60% recall at
500k+ rows with one random seeding pass and 97-99% with 8 (itopk 256, search_width 4, graph_degree 64),
and NVIDIA/cuvs#761 traces low recall at dim 1024 to a too-small ``itopk_size``. cuvs-bench sweeps
``itopk`` 64..256 and finds ~99% recall around ``search_width`` 8 (NVIDIA/cuvs#1822). These defaults
are the starting point; ``make bench-gpu`` sweeps the search side on the real data and card.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

import numpy as np
from gmco_common.config import ConfigError
from gmco_common.errors import ResourceExhausted

ENV = "GMCO_SHARD_"
BUILD_ALGOS = ("ivf_pq", "nn_descent")
# cuVS rounds itopk_size up to a multiple of 32 and needs it >= k.
_ITOPK_ALIGN = 32
# Device-memory headroom kept outside the pool for the CUDA context, cuBLAS workspaces and NVML.
POOL_HEADROOM_BYTES = 512 << 20
_RMM_ALIGN = 256


@dataclass(frozen=True)
class CagraParams:
    """CAGRA build/search parameters and the device-memory pool; the defaults are the documented ones."""

    graph_degree: int = 64
    intermediate_graph_degree: int = 128
    build_algo: str = "ivf_pq"
    itopk_size: int = 128
    search_width: int = 4
    num_random_samplings: int = 8
    pool_bytes: int = 0  # 0: take pool_fraction of the device's memory
    pool_fraction: float = 0.85

    def __post_init__(self) -> None:
        for name in ("graph_degree", "intermediate_graph_degree", "itopk_size", "search_width",
                     "num_random_samplings"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{ENV}CAGRA_{name.upper()}={getattr(self, name)} must be >= 1")
        if self.intermediate_graph_degree < self.graph_degree:
            raise ConfigError(f"{ENV}CAGRA_INTERMEDIATE_GRAPH_DEGREE={self.intermediate_graph_degree} must be >= "
                              f"{ENV}CAGRA_GRAPH_DEGREE={self.graph_degree} (CAGRA prunes the intermediate graph "
                              "down to graph_degree)")
        if self.build_algo not in BUILD_ALGOS:
            raise ConfigError(f"{ENV}CAGRA_BUILD_ALGO={self.build_algo!r} is not one of {', '.join(BUILD_ALGOS)}")
        if self.pool_bytes < 0:
            raise ConfigError(f"{ENV}GPU_POOL_BYTES={self.pool_bytes} must be >= 0 (0 = use GPU_POOL_FRACTION)")
        if not 0 < self.pool_fraction <= 1:
            raise ConfigError(f"{ENV}GPU_POOL_FRACTION={self.pool_fraction} must be in (0, 1]")

    @classmethod
    def from_extra(cls, extra: dict[str, str]) -> CagraParams:
        """Read ``cagra_*`` / ``gpu_pool_*`` entries of ``IndexParams.extra``; absent ones keep the defaults."""
        kwargs: dict[str, Any] = {}
        for f in fields(cls):
            key = f"gpu_{f.name}" if f.name.startswith("pool_") else f"cagra_{f.name}"
            if key in extra:
                raw = extra[key]
                try:
                    kwargs[f.name] = type(f.default)(raw)
                except ValueError:
                    raise ConfigError(f"{ENV}{key.upper()}={raw!r} is not a valid {type(f.default).__name__}") from None
        return cls(**kwargs)

    def itopk_for(self, k: int, ef: int = 0) -> int:
        """The itopk_size of one search: the request's ``ef`` or the default, at least ``k``, 32-aligned."""
        want = max(ef or self.itopk_size, k)
        return -(-want // _ITOPK_ALIGN) * _ITOPK_ALIGN

    def pool_size(self, total_bytes: int) -> int:
        """Bytes for the rmm pool on a device with ``total_bytes``: the explicit size, or the fraction of what
        is left after the headroom, 256-aligned as rmm requires."""
        size = self.pool_bytes or int((total_bytes - POOL_HEADROOM_BYTES) * self.pool_fraction)
        if size > total_bytes:
            raise ConfigError(f"{ENV}GPU_POOL_BYTES={self.pool_bytes} exceeds the device's {total_bytes} bytes")
        if size <= 0:
            raise ConfigError(f"the device has {total_bytes} bytes, too little for a memory pool")
        return size // _RMM_ALIGN * _RMM_ALIGN

    def device_bytes(self, rows: int, dim: int, building: bool) -> int:
        """Device memory the sealed segment needs: FP16 rows, the final graph (uint32), and while building the
        intermediate kNN graph (int64 ids) that CAGRA prunes. A lower bound: IVF-PQ/NN-descent workspaces
        come on top, so a load that passes this check can still run out (and then fails cleanly)."""
        need = rows * dim * 2 + rows * self.graph_degree * 4
        if building:
            need += rows * self.intermediate_graph_degree * 8
        return need


def check_fits(need: int, pool: int, rows: int) -> None:
    """Refuse a load that cannot fit in the pool, before touching the device."""
    if need > pool:
        raise ResourceExhausted(
            f"{rows} rows need at least {need / 2**30:.2f} GiB of GPU memory but the pool has {pool / 2**30:.2f} GiB; "
            f"raise {ENV}GPU_POOL_BYTES / {ENV}GPU_POOL_FRACTION, use a larger GPU, or spread the slots over more "
            "shards")


def bitset(allow: np.ndarray) -> np.ndarray:
    """The cuVS bitset of a boolean mask: uint32 words, bit ``i % 32`` of word ``i // 32`` set = row i allowed."""
    packed = np.packbits(np.asarray(allow, dtype=bool), bitorder="little")
    packed = np.pad(packed, (0, (-packed.size) % 4))
    return packed.view("<u4")


_OOM_MARKERS = ("out_of_memory", "out of memory", "bad_alloc", "cudaerrormemoryallocation", "maximum pool size exceeded")


def is_out_of_memory(exc: BaseException) -> bool:
    """True for device allocation failures: rmm/CuPy raise MemoryError, cuVS a CuvsException whose text names
    the failed allocation (``std::bad_alloc``, ``rmm::out_of_memory``, ``cudaErrorMemoryAllocation``)."""
    if isinstance(exc, MemoryError):
        return True
    text = str(exc).lower()
    return any(marker in text for marker in _OOM_MARKERS)
