"""Shard settings, read from GMCO_SHARD_* environment variables."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from gmco_common.config import ConfigError, ServerSettings, port_setting, setting
from gmco_common.features import DEFAULT_DIM, DEFAULT_SEED

from gmco_shard.index.base import BACKENDS
from gmco_shard.index.params import (
    BUILD_ALGOS,
    MILVUS_CONSISTENCY_LEVELS,
    MILVUS_INDEX_TYPES,
    MILVUS_VECTOR_TYPES,
    CagraParams,
    HnswParams,
    IndexParams,
    IvfParams,
    MilvusParams,
)
from gmco_shard.planner import ACORN_MAX_FRACTION, EXACT_MAX_ROWS, PlannerCosts
from gmco_shard.store import DEFER_MAX_ROWS, MERGE_FACTOR, PURGE_FRACTION, SEAL_ROWS

PREFIX = "GMCO_SHARD_"


def _pos(v: float) -> bool:
    return v > 0


@dataclass(frozen=True)
class Settings(ServerSettings):
    port: int = port_setting(50051)
    shard_id: int = setting(0, help="which shard this is (owns the slots the slot map gives it)",
                            check=lambda v: v >= 0, check_msg=">= 0")
    shard_count: int = setting(1, help="shards in the even slot map", check=lambda v: 1 <= v <= 4096,
                               check_msg="1..4096")
    shard_ids: str = setting("", help="several logical shards served by this one process from one store, each "
                             "answered in the same Search call: ids and ranges, e.g. '0-7' or '0,2,5-6' (at most "
                             "4096; SHARD_ID is then their first); empty: SHARD_ID alone")
    slot_map_file: Path | None = setting(None, help="JSON slot map (overrides the even map; see gmco_common.slots)")
    replica_id: int = setting(0, help="replica number within the shard (logs, stats)", check=lambda v: v >= 0,
                              check_msg=">= 0")
    dim: int = setting(1024, help="embedding dimension", check=_pos, check_msg="must be > 0")
    metric: str = setting("ip", help="similarity", choices=("ip", "l2"))
    index_backend: str = setting("ivf", help="sealed-segment index (ivf: k-means lists over the FP16 rows; hnsw: "
                                 "faiss graph; exact; cuvs; milvus)", choices=tuple(BACKENDS))
    hnsw_m: int = setting(HnswParams.m, help="HNSW graph degree M", check=_pos, check_msg="must be > 0")
    hnsw_ef_construction: int = setting(HnswParams.ef_construction, help="HNSW efConstruction", check=_pos,
                                        check_msg="must be > 0")
    hnsw_ef_search: int = setting(256, help="HNSW efSearch default (recall@10 0.994 on the 100k reference set; "
                                  "0.954 at 64)", check=_pos, check_msg="must be > 0")
    ivf_lists_factor: float = setting(IvfParams.lists_factor, help="ivf backend: lists per segment = this x "
                                      "sqrt(rows)", check=_pos, check_msg="must be > 0")
    ivf_nprobe: int = setting(IvfParams.nprobe, help="ivf backend: lists scanned per query (a request's ef "
                              "overrides it)", check=_pos, check_msg="must be > 0")
    exact_max_rows: int = setting(EXACT_MAX_ROWS, help="scan a segment exactly when at most this many of its rows "
                                  "pass the filter (measured crossover: docs/benchmarks.md, 'Shard at scale')",
                                  check=lambda v: v >= 0, check_msg=">= 0")
    acorn_max_fraction: float = setting(ACORN_MAX_FRACTION, help="below this allowed fraction a filtered search "
                                        "walks the HNSW graph ACORN-style; above it, faiss's pre-filter",
                                        check=lambda v: 0 <= v <= 1, check_msg="0..1")
    seal_rows: int = setting(SEAL_ROWS, help="the growing (exactly searched) segment is sealed with its own index "
                             "at this many rows", check=_pos, check_msg="must be > 0")
    bulk_apply_rate: float = setting(
        5000.0, help="log entries/s (over 0.5 s) from which a replica is in a bulk catch-up (an import): its "
        "index builds wait, the rows searched exactly, until the burst has been over for 2 s, then one build "
        "indexes them all; 0 = build as rows arrive", check=lambda v: v >= 0, check_msg=">= 0")
    bulk_defer_max_rows: int = setting(
        DEFER_MAX_ROWS, help="most rows a bulk catch-up leaves unindexed (exactly scanned) before it builds anyway",
        check=lambda v: v >= 0, check_msg=">= 0")
    merge_factor: int = setting(MERGE_FACTOR, help="sealed segments of one size tier merge when this many exist",
                                check=lambda v: v >= 2, check_msg=">= 2")
    purge_fraction: float = setting(PURGE_FRACTION, help="a segment is rebuilt without its tombstones when they "
                                    "exceed this fraction of its rows", check=lambda v: 0 < v <= 1,
                                    check_msg="in (0, 1]")
    maintenance_threads: int = setting(0, help="threads a background index build (seal, merge, purge, compact) "
                                       "may use; 0 = all cores but one, so that searches keep a core",
                                       check=lambda v: v >= 0, check_msg=">= 0")
    batch_window_ms: float = setting(0.0, help="micro-batching window for concurrent searches (0 = off; 1 on GPU)",
                                     check=lambda v: 0 <= v <= 20, check_msg="0..20 ms")
    batch_max: int = setting(1024, help="most query rows merged into one batch", check=_pos, check_msg="must be > 0")
    search_in_thread: bool = setting(
        True, help="run each search in a worker thread, so that the event loop answers other calls meanwhile and "
        "the searches of concurrent calls overlap on several cores; false: on the event loop, which saves the "
        "thread hop (measured in docs/benchmarks.md, 'Miss and hit paths') where a process has about one core")
    cagra_graph_degree: int = setting(CagraParams.graph_degree, help="cuvs backend: CAGRA graph degree",
                                      check=_pos, check_msg="must be > 0")
    cagra_intermediate_graph_degree: int = setting(CagraParams.intermediate_graph_degree, help="cuvs backend: "
                                                   "degree of the kNN graph CAGRA prunes (>= graph degree)",
                                                   check=_pos, check_msg="must be > 0")
    cagra_build_algo: str = setting(CagraParams.build_algo, help="cuvs backend: kNN graph construction",
                                    choices=BUILD_ALGOS)
    cagra_itopk_size: int = setting(CagraParams.itopk_size, help="cuvs backend: default CAGRA itopk_size (a "
                                    "request's ef overrides it; main recall/speed knob)", check=_pos,
                                    check_msg="must be > 0")
    cagra_search_width: int = setting(CagraParams.search_width, help="cuvs backend: CAGRA nodes expanded per "
                                      "iteration", check=_pos, check_msg="must be > 0")
    cagra_num_random_samplings: int = setting(CagraParams.num_random_samplings, help="cuvs backend: CAGRA seeding "
                                              "passes (1 loses recall from ~100k rows, NVIDIA/cuvs#2102)",
                                              check=_pos, check_msg="must be > 0")
    gpu_pool_bytes: int = setting(CagraParams.pool_bytes, help="cuvs backend: rmm pool size in bytes (0 = "
                                  "GPU_POOL_FRACTION of the device)", check=lambda v: v >= 0, check_msg=">= 0")
    gpu_pool_fraction: float = setting(CagraParams.pool_fraction, help="cuvs backend: share of device memory "
                                       "(less 512 MiB headroom) for the rmm pool", check=lambda v: 0 < v <= 1,
                                       check_msg="in (0, 1]")
    feature_dim: int = setting(DEFAULT_DIM, help="width of the bandit features a search returns with "
                               "include_features (must equal GMCO_RL_STATE_BANDIT_DIM)", check=lambda v: 1 <= v <= 256,
                               check_msg="1..256")
    feature_seed: int = setting(DEFAULT_SEED, help="seed of the feature projection (must equal "
                                "GMCO_RL_STATE_PROJECTION_SEED)", check=lambda v: 0 <= v < 2**63,
                                check_msg="0..2^63-1 (a numpy seed)")
    max_k: int = setting(1000, help="largest k a Search may ask for", check=_pos, check_msg="must be > 0")
    max_batch: int = setting(4096, help="largest query batch", check=_pos, check_msg="must be > 0")
    max_get: int = setting(10000, help="largest GetMedia id list", check=_pos, check_msg="must be > 0")
    data_dir: Path | None = setting(None, help="datagen catalogue to load this shard's slots from at start")
    snapshot_dir: Path | None = setting(None, help="snapshots: loaded at start when present, written periodically")
    snapshot_interval_seconds: float = setting(300.0, help="seconds between snapshots (0 = only on request)",
                                               check=lambda v: v >= 0, check_msg=">= 0")
    catalog_dsn: str | None = setting(None, help="catalogue log to tail (postgresql://... or a SQLite path)")
    milvus_uri: str | None = setting(None, help="milvus backend: a Milvus URI (http://host:19530) or a Milvus Lite "
                                     "file path ending in .db")
    milvus_token: str | None = setting(None, help="milvus backend: token (user:password or API key) of a remote Milvus")
    milvus_collection: str | None = setting(None, help="milvus backend: collection name prefix (default "
                                            "gmco_shard_<SHARD_ID>_r<REPLICA_ID>)")
    milvus_index_type: str = setting(MilvusParams.index_type, help="milvus backend: index type (GPU_CAGRA on a GPU Milvus)",
                                     choices=MILVUS_INDEX_TYPES)
    milvus_index_params: str | None = setting(None, help="milvus backend: JSON build parameters merged over the "
                                              "defaults (HNSW: M and efConstruction from GMCO_SHARD_HNSW_*)")
    milvus_consistency: str = setting(MilvusParams.consistency, help="milvus backend: search consistency level (the sealed "
                                      "collection is written once, then only read)", choices=MILVUS_CONSISTENCY_LEVELS)
    milvus_vector_type: str = setting(MilvusParams.vector_type, help="milvus backend: stored vector type (auto: float32 on Milvus "
                                      "Lite, which has no FP16 vectors; float16 on a Milvus server)",
                                      choices=MILVUS_VECTOR_TYPES)
    milvus_timeout_seconds: float = setting(MilvusParams.timeout_seconds, help="milvus backend: timeout of one Milvus call",
                                            check=_pos, check_msg="must be > 0")
    milvus_build_timeout_seconds: float = setting(MilvusParams.build_timeout_seconds, help="milvus backend: timeout of the slow calls of a "
                                                  "build (insert, flush, load: load builds the HNSW index)",
                                                  check=_pos, check_msg="must be > 0")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.shard_ids:
            hosted = parse_shard_ids(self.shard_ids, f"{PREFIX}SHARD_IDS")
            if self.shard_id not in (0, hosted[0]):
                raise ConfigError(f"{PREFIX}SHARD_ID={self.shard_id} is not the first of {PREFIX}SHARD_IDS="
                                  f"{self.shard_ids!r}; leave SHARD_ID unset with SHARD_IDS")
            object.__setattr__(self, "shard_id", hosted[0])
            if hosted[-1] >= self.shard_count and self.slot_map_file is None:
                raise ConfigError(f"{PREFIX}SHARD_IDS={self.shard_ids!r} names shard {hosted[-1]}, but "
                                  f"{PREFIX}SHARD_COUNT={self.shard_count}: every id must be < SHARD_COUNT")
        if self.shard_id >= self.shard_count and self.slot_map_file is None:
            raise ConfigError(f"{PREFIX}SHARD_ID={self.shard_id} must be < {PREFIX}SHARD_COUNT={self.shard_count}")
        if self.data_dir is not None and not (self.data_dir / "meta.json").is_file():
            raise ConfigError(f"{PREFIX}DATA_DIR={self.data_dir} is not a catalogue directory (no meta.json); "
                              "create one with `python -m gmco_common.datagen --out DIR`")
        if self.index_backend == "milvus" and not self.milvus_uri:
            raise ConfigError(f"{PREFIX}INDEX_BACKEND=milvus needs {PREFIX}MILVUS_URI: a Milvus URI "
                              "(http://host:19530) or a Milvus Lite file path ending in .db")
        self.index_params()  # the typed parameters' own cross-field checks, at start

    @property
    def hosted_shards(self) -> tuple[int, ...]:
        """The logical shards this process serves, ascending: SHARD_IDS, or SHARD_ID alone."""
        return parse_shard_ids(self.shard_ids, f"{PREFIX}SHARD_IDS") if self.shard_ids else (self.shard_id,)

    def index_params(self) -> IndexParams:
        """The index backends' typed parameters, built from these settings."""
        cagra = CagraParams(
            graph_degree=self.cagra_graph_degree, intermediate_graph_degree=self.cagra_intermediate_graph_degree,
            build_algo=self.cagra_build_algo, itopk_size=self.cagra_itopk_size, search_width=self.cagra_search_width,
            num_random_samplings=self.cagra_num_random_samplings, pool_bytes=self.gpu_pool_bytes,
            pool_fraction=self.gpu_pool_fraction)
        milvus = None
        if self.milvus_uri:
            milvus = MilvusParams(
                uri=self.milvus_uri, token=self.milvus_token or "",
                collection=self.milvus_collection or f"gmco_shard_{self.shard_id}_r{self.replica_id}",
                index_type=self.milvus_index_type, index_params=self.milvus_index_params or "",
                consistency=self.milvus_consistency, vector_type=self.milvus_vector_type,
                timeout_seconds=self.milvus_timeout_seconds, build_timeout_seconds=self.milvus_build_timeout_seconds)
        hnsw = HnswParams(self.hnsw_m, self.hnsw_ef_construction, self.hnsw_ef_search)
        ivf = IvfParams(lists_factor=self.ivf_lists_factor, nprobe=self.ivf_nprobe)
        return IndexParams(self.metric, hnsw=hnsw, ivf=ivf, cagra=cagra, milvus=milvus)

    def planner_costs(self) -> PlannerCosts:
        return PlannerCosts(exact_max_rows=self.exact_max_rows, acorn_max_fraction=self.acorn_max_fraction)


MAX_HOSTED_SHARDS = 4096


def parse_shard_ids(spec: str, var: str) -> tuple[int, ...]:
    """``'0-3,7'`` -> ``(0, 1, 2, 3, 7)``: ids and inclusive ranges, each id once, ascending."""
    ids: set[int] = set()
    for part in filter(None, (p.strip() for p in spec.split(","))):
        first, sep, last = part.partition("-")
        if not first.strip().isdigit() or (sep and not last.strip().isdigit()):
            raise ConfigError(f"{var}: {part[:40]!r} is not a shard id or a range like '0-7'")
        lo, hi = int(first), int(last) if sep else int(first)
        if hi < lo:
            raise ConfigError(f"{var}: the range {part!r} is empty (write it low-high)")
        if hi - lo + len(ids) >= MAX_HOSTED_SHARDS or hi >= MAX_HOSTED_SHARDS:
            raise ConfigError(f"{var}: at most {MAX_HOSTED_SHARDS} shards, ids < {MAX_HOSTED_SHARDS}")
        ids.update(range(lo, hi + 1))
    if not ids:
        raise ConfigError(f"{var}: no shard id in {spec[:40]!r}")
    return tuple(sorted(ids))
