"""Typed parameters of the index backends, built once from the shard's settings (``Settings.index_params``)
and validated here, where their defaults are written once.

CAGRA defaults are raised above cuVS's own (``itopk_size`` 64, ``search_width`` 1, ``num_random_samplings``
1), which users report give low recall from ~100k rows up: NVIDIA/cuvs#2102 measured ~60% recall at
500k+ rows with one random seeding pass and 97-99% with 8 (itopk 256, search_width 4, graph_degree 64),
and NVIDIA/cuvs#761 traces low recall at dim 1024 to a too-small ``itopk_size``. cuvs-bench sweeps
``itopk`` 64..256 and finds ~99% recall around ``search_width`` 8 (NVIDIA/cuvs#1822). These defaults
are the starting point; ``bench/bench_gpu.py`` sweeps the search side on the real data and card.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from gmco_common.config import ConfigError

ENV = "GMCO_SHARD_"
METRICS = ("ip", "l2")
BUILD_ALGOS = ("ivf_pq", "nn_descent")
# cuVS rounds itopk_size up to a multiple of 32 and needs it >= k.
_ITOPK_ALIGN = 32
# Device-memory headroom kept outside the pool for the CUDA context, cuBLAS workspaces and NVML.
POOL_HEADROOM_BYTES = 512 << 20
_RMM_ALIGN = 256
MILVUS_INDEX_TYPES = ("HNSW", "HNSW_SQ", "GPU_CAGRA", "IVF_FLAT", "IVF_SQ8", "GPU_IVF_FLAT", "FLAT", "AUTOINDEX")
MILVUS_CONSISTENCY_LEVELS = ("Strong", "Session", "Bounded", "Eventually")
MILVUS_VECTOR_TYPES = ("auto", "float16", "float32")


@dataclass(frozen=True)
class HnswParams:
    """faiss HNSW over the segment's FP16 rows: graph degree M, build and search breadth."""

    m: int = 32
    ef_construction: int = 200
    ef_search: int = 128

    def __post_init__(self) -> None:
        for name in ("m", "ef_construction", "ef_search"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{ENV}HNSW_{name.upper()}={getattr(self, name)} must be >= 1")


@dataclass(frozen=True)
class IvfParams:
    """IVF over the segment's FP16 rows: lists = lists_factor * sqrt(rows); nprobe lists per search."""

    lists_factor: float = 1.0
    nprobe: int = 16
    train_iterations: int = 10
    seed: int = 1234

    def __post_init__(self) -> None:
        if self.lists_factor <= 0:
            raise ConfigError(f"{ENV}IVF_LISTS_FACTOR={self.lists_factor} must be > 0")
        if self.nprobe < 1:
            raise ConfigError(f"{ENV}IVF_NPROBE={self.nprobe} must be >= 1")
        if self.train_iterations < 1:
            raise ConfigError(f"{ENV}IVF_TRAIN_ITERATIONS={self.train_iterations} must be >= 1")


@dataclass(frozen=True)
class CagraParams:
    """CAGRA build/search parameters and the device-memory pool; the defaults are the documented ones."""

    graph_degree: int = 64
    intermediate_graph_degree: int = 128
    build_algo: str = "ivf_pq"
    itopk_size: int = 128
    search_width: int = 4
    num_random_samplings: int = 8
    pool_bytes: int = 0  # 0: take pool_fraction of the device's free memory
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

    def itopk_for(self, k: int, ef: int = 0) -> int:
        """The itopk_size of one search: the request's ``ef`` or the default, at least ``k``, 32-aligned."""
        want = max(ef or self.itopk_size, k)
        return -(-want // _ITOPK_ALIGN) * _ITOPK_ALIGN

    def pool_size(self, free_bytes: int) -> int:
        """Bytes for the rmm pool on a device with ``free_bytes`` free (what other processes and this one's
        CUDA context hold is not there to take): the explicit size, or the fraction of what is free after
        the headroom, 256-aligned as rmm requires."""
        size = self.pool_bytes or int((free_bytes - POOL_HEADROOM_BYTES) * self.pool_fraction)
        if size > free_bytes:
            raise ConfigError(f"{ENV}GPU_POOL_BYTES={self.pool_bytes} exceeds the device's {free_bytes} free bytes")
        if size <= 0:
            raise ConfigError(f"the device has {free_bytes} bytes free, too little for a memory pool")
        return size // _RMM_ALIGN * _RMM_ALIGN

    def device_bytes(self, rows: int, dim: int, building: bool) -> int:
        """Device memory the sealed segment needs: FP16 rows, the final graph (uint32), and while building the
        intermediate kNN graph (int64 ids) that CAGRA prunes. A lower bound: IVF-PQ/NN-descent workspaces
        come on top, so a load that passes this check can still run out (and then fails cleanly)."""
        need = rows * dim * 2 + rows * self.graph_degree * 4
        if building:
            need += rows * self.intermediate_graph_degree * 8
        return need


@dataclass(frozen=True)
class MilvusParams:
    """Where the milvus backend keeps its collections and how it indexes them."""

    uri: str
    token: str = ""
    collection: str = "gmco_shard"
    index_type: str = "HNSW"
    index_params: str = ""  # JSON object merged over the defaults
    consistency: str = "Bounded"
    vector_type: str = "auto"
    timeout_seconds: float = 30.0
    build_timeout_seconds: float = 3600.0  # insert, flush, index and load of a whole segment

    def __post_init__(self) -> None:
        if not self.uri:
            raise ConfigError(f"the milvus backend needs {ENV}MILVUS_URI: a Milvus URI (http://host:19530) "
                              "or a Milvus Lite file path ending in .db")
        for name, value, allowed in (("INDEX_TYPE", self.index_type, MILVUS_INDEX_TYPES),
                                     ("CONSISTENCY", self.consistency, MILVUS_CONSISTENCY_LEVELS),
                                     ("VECTOR_TYPE", self.vector_type, MILVUS_VECTOR_TYPES)):
            if value not in allowed:
                raise ConfigError(f"{ENV}MILVUS_{name}={value!r}: use one of {', '.join(allowed)}")
        if self.lite and self.vector_type == "float16":
            raise ConfigError(f"Milvus Lite has no FLOAT16_VECTOR: set {ENV}MILVUS_VECTOR_TYPE=float32 (or auto)")
        if self.index_params:
            self.extra_build_params()  # fail at start, not at the first build

    @property
    def lite(self) -> bool:
        return self.uri.endswith(".db")

    def extra_build_params(self) -> dict[str, Any]:
        if not self.index_params:
            return {}
        try:
            extra = json.loads(self.index_params)
        except ValueError as exc:
            raise ConfigError(f"{ENV}MILVUS_INDEX_PARAMS is not JSON: {exc}") from None
        if not isinstance(extra, dict):
            raise ConfigError(f"{ENV}MILVUS_INDEX_PARAMS must be a JSON object, e.g. {{\"M\": 32}}")
        return extra


@dataclass(frozen=True)
class IndexParams:
    """Everything an index backend may read; each reads its own part."""

    metric: str = "ip"
    hnsw: HnswParams = field(default_factory=HnswParams)
    ivf: IvfParams = field(default_factory=IvfParams)
    cagra: CagraParams = field(default_factory=CagraParams)
    milvus: MilvusParams | None = None

    def __post_init__(self) -> None:
        if self.metric not in METRICS:
            raise ConfigError(f"unknown metric {self.metric!r}; use one of {', '.join(METRICS)}")
