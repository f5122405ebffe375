"""Router settings, read from ``GMCO_ROUTER_*`` environment variables."""

from __future__ import annotations

import socket
from dataclasses import dataclass
from pathlib import Path

from gmco_common.cache_key import DEFAULTS
from gmco_common.config import ConfigError, ServerSettings, port_setting, setting
from gmco_common.ids import MAX_DELETE_IDS, MAX_FEEDBACK_EVENTS, MAX_WRITE_ITEMS

PREFIX = "GMCO_ROUTER_"


def _positive(v: float) -> bool:
    return v > 0


def _non_negative(v: float) -> bool:
    return v >= 0


@dataclass(frozen=True)
class Settings(ServerSettings):
    port: int = port_setting(50050, help="gRPC port of the public RecommendationService; 0 picks a free port")
    shards: str = setting(
        "",
        help="shard replicas: '<shard>=<host:port>|<host:port>,<shard>=...', e.g. "
        "'0=127.0.0.1:7001|127.0.0.1:7011,1=127.0.0.1:7002' (or use SHARD_DNS)",
    )
    shard_dns: str = setting(
        "",
        help="instead of SHARDS: a host:port template with '{shard}', e.g. "
        "'gmco-shard-{shard}.gmco-shard:50051'; every address it resolves to is a replica",
    )
    shard_count: int = setting(0, help="number of shards when SHARD_DNS is used", check=_non_negative,
                               check_msg=">= 0")
    dns_refresh_seconds: float = setting(10.0, help="how often SHARD_DNS is re-resolved", check=_positive,
                                         check_msg="> 0")
    catalog_dsn: str | None = setting(
        None, help="durable catalogue log (postgresql://... or a SQLite path): writes are acknowledged after "
                   "committing there and carry its lsn; unset = apply writes directly to every replica")
    catalog_timeout_seconds: float = setting(
        2.0, help="longest wait for the catalogue log to take a write before answering UNAVAILABLE (keep "
                  "(1 + Envoy retries) x this under Envoy's route timeout)", check=_positive, check_msg="> 0")
    media_dim: int = setting(1024, help="embedding dimension, checked on catalogue writes",
                             check=lambda v: v > 0, check_msg="must be > 0")
    slot_map_file: Path | None = setting(
        None, help="JSON slot map (SlotMap.to_json); default: an even map")
    shard_tls_ca_file: Path | None = setting(
        None, help="CA that signed the shards' certificates (PEM): calls to the shards use TLS")
    shard_tls_cert_file: Path | None = setting(
        None, help="this router's client certificate for the shards (PEM), for shards that require mTLS")
    shard_tls_key_file: Path | None = setting(None, help="the client certificate's private key (PEM)")
    cache_target: str = setting("127.0.0.1:50052", help="host:port of the cache service")
    ontology_target: str = setting("127.0.0.1:50053", help="host:port of the ontology service")
    rl_state_target: str = setting("127.0.0.1:50054", help="host:port of the rl_state service")
    max_k: int = setting(100, help="largest k a caller may ask for", check=_positive, check_msg="> 0")
    max_batch: int = setting(64, help="largest RecommendBatch", check=_positive, check_msg="> 0")
    max_feedback_events: int = setting(
        MAX_FEEDBACK_EVENTS, help="most events in one RecordFeedback", check=lambda v: 0 < v <= MAX_FEEDBACK_EVENTS,
        check_msg=f"1..{MAX_FEEDBACK_EVENTS}")
    max_write_items: int = setting(MAX_WRITE_ITEMS, help="most items in one UpsertMedia",
                                   check=lambda v: 0 < v <= MAX_WRITE_ITEMS, check_msg=f"1..{MAX_WRITE_ITEMS}")
    max_delete_ids: int = setting(MAX_DELETE_IDS, help="most ids in one DeleteMedia",
                                  check=lambda v: 0 < v <= MAX_DELETE_IDS, check_msg=f"1..{MAX_DELETE_IDS}")
    max_in_flight: int = setting(
        256, help="ceiling of the admission limit: requests this router works on at once (a RecommendBatch "
        "counts its entries); beyond the limit a call is refused at once with RESOURCE_EXHAUSTED (counted in "
        "gmco_admission_shed_total) instead of queueing. The limit itself follows latency between "
        "MIN_IN_FLIGHT and this (gmco_common.admission)", check=_positive, check_msg="> 0")
    min_in_flight: int = setting(8, help="floor of the admission limit", check=_positive, check_msg="> 0")
    queue_target_ms: float = setting(
        20.0, help="a call that waited longer than this between Envoy receiving it (its x-gmco-edge-start-us "
        "header) and its handler starting is refused with RESOURCE_EXHAUSTED while the queue is standing: "
        "while even the shortest wait of each QUEUE_INTERVAL_MS exceeds this. The waits are taken relative "
        "to the shortest of the last minute, so a constant clock skew between Envoy and the router cancels "
        "out. 0 = off (gmco_common.admission.QueueDelay)", check=_non_negative, check_msg=">= 0")
    queue_interval_ms: float = setting(
        500.0, help="how often the queue is judged standing or not (a stall of the process shorter than this "
        "never makes it standing); a call that waited longer than this is refused in any case",
        check=_positive, check_msg="> 0")
    overfetch: float = setting(4.0, help="each shard returns k' = ceil(k * OVERFETCH) candidates (>= 1)",
                               check=lambda v: v >= 1, check_msg=">= 1")
    min_candidates: int = setting(50, help="lower bound of k' so that ranking has room to explore",
                                  check=_positive, check_msg="> 0")
    shard_max_k: int = setting(1000, help="upper bound of k' (the shards' own maximum k)", check=_positive,
                               check_msg="> 0")
    excluded_seen_max: int = setting(200, help="most recently seen items put into the search filter",
                                     check=_non_negative, check_msg=">= 0")
    call_timeout_seconds: float = setting(
        2.0, help="timeout of a downstream call when the caller sent no deadline", check=_positive,
        check_msg="> 0")
    cache_timeout_ms: float = setting(
        250.0, help="longest wait for a cache lookup (and at most half of what the caller has left); a slower "
        "cache counts as a miss and the answer says degraded=cache", check=_positive, check_msg="> 0")
    rl_state_timeout_ms: float = setting(
        1000.0, help="longest wait for rl_state's GetUserState and Rank (each at most half of what the caller "
        "has left); slower, the answer is degraded: cold-start state, retrieval order", check=_positive,
        check_msg="> 0")
    ontology_timeout_ms: float = setting(
        500.0, help="longest wait for the ontology (at most half of what the caller has left); slower, the "
        "last known filter for the context is used", check=_positive, check_msg="> 0")
    cache_ttl_seconds: int = setting(300, help="TTL of cached recommendations", check=_positive, check_msg="> 0")
    user_version_ttl_seconds: float = setting(
        60.0, help="how long a user's state version learnt here is trusted for the cache key", check=_non_negative,
        check_msg=">= 0")
    filter_cache_ttl_seconds: float = setting(
        30.0, help="how long a compiled filter is reused without asking the ontology", check=_non_negative,
        check_msg=">= 0")
    local_cache_entries: int = setting(100_000, help="size of each in-process LRU (versions, filters)",
                                       check=_positive, check_msg="> 0")
    list_cache_entries: int = setting(
        20_000, help="recommendation lists kept in this router's own LRU in front of the cache service, which "
        "spares a hit its cache-service round trip; ring hash keeps a user on one router (0 = off)",
        check=_non_negative, check_msg=">= 0")
    user_state_cache_entries: int = setting(
        4_096, help="user states (preference vector, seen items) kept in this router's LRU by version: a miss "
        "for a user whose version the router knows (USER_VERSION_TTL_SECONDS) and whose state it holds at that "
        "version skips GetUserState; feedback bumps the version, so a changed state is never used (0 = off; "
        "at most about 4 KB each at 1024 dims: an FP16 vector and up to 200 seen ids)", check=_non_negative,
        check_msg=">= 0")
    list_cache_ttl_seconds: float = setting(
        30.0, help="how long a list stays in the router's LRU; a list can outlive its cache-service entry by at "
        "most this much", check=_positive, check_msg="> 0")
    health_interval_seconds: float = setting(1.0, help="gRPC health-check period per shard replica",
                                             check=_positive, check_msg="> 0")
    breaker_failures: int = setting(5, help="consecutive failures that open a replica's circuit",
                                    check=_positive, check_msg="> 0")
    breaker_cooldown_seconds: float = setting(2.0, help="how long an open circuit stays open before a probe",
                                              check=_positive, check_msg="> 0")
    batch_window_ms: float = setting(
        5.0, help="the longest a miss waits for a Search of its kind already in flight from this router; the "
        "misses that waited go together in the next Search per shard. A miss with none in flight goes at once "
        "(0 = every miss searches alone; measured: docs/benchmarks.md, 'Miss and hit paths')",
        check=lambda v: 0 <= v <= 50, check_msg="0..50 ms")
    batch_max: int = setting(32, help="most misses in one shared Search", check=_positive, check_msg="> 0")
    rank_batch: bool = setting(
        True, help="the misses that shared a Search are ranked by one rl_state RankBatch call instead of one Rank "
        "each (an rl_state without RankBatch is detected and asked one by one)")
    cache_put_window_ms: float = setting(
        50.0, help="cache writes made after replies within this window share one PutRecommendationsBatch call "
        "(the list is in this router's LRU at once; other routers see it this much later); 0 = one call each, at "
        "once", check=lambda v: 0 <= v <= 1000, check_msg="0..1000")
    cache_put_max_pending: int = setting(
        1000, help="cache writes run after the reply; beyond this many in flight a write is dropped (counted in "
        "gmco_router_cache_puts_total{result=dropped})", check=_positive, check_msg="> 0")
    default_surface: str = setting(DEFAULTS.surface, help="surface of a request that names none",
                                   choices=("HOMEPAGE", "VIDEO_PAGE", "SEARCH_RESULTS"))
    default_region: str = setting(DEFAULTS.region, help="ontology Region id of a request that names none")
    default_device: str = setting(DEFAULTS.device, help="ontology Device id of a request that names none")
    hedge: bool = setting(True, help="hedge a shard call slower than its replica's recent p95")
    hedge_min_delay_ms: float = setting(2.0, help="never hedge earlier than this", check=_non_negative,
                                        check_msg=">= 0")
    hedge_min_samples: int = setting(20, help="latency samples a replica needs before hedging applies",
                                     check=_positive, check_msg="> 0")

    def __post_init__(self) -> None:
        super().__post_init__()
        if bool(self.shards) == bool(self.shard_dns):
            raise ConfigError(f"set exactly one of {PREFIX}SHARDS and {PREFIX}SHARD_DNS")
        if self.shard_dns:
            if "{shard}" not in self.shard_dns:
                raise ConfigError(f"{PREFIX}SHARD_DNS must contain '{{shard}}'")
            if self.shard_count < 1:
                raise ConfigError(f"{PREFIX}SHARD_COUNT must be >= 1 with {PREFIX}SHARD_DNS")
        if (self.shard_tls_cert_file is None) != (self.shard_tls_key_file is None):
            raise ConfigError(f"set both {PREFIX}SHARD_TLS_CERT_FILE and {PREFIX}SHARD_TLS_KEY_FILE, or neither")
        if self.shard_tls_cert_file is not None and self.shard_tls_ca_file is None:
            raise ConfigError(f"{PREFIX}SHARD_TLS_CERT_FILE needs {PREFIX}SHARD_TLS_CA_FILE (the shards' CA)")
        for path in (self.shard_tls_ca_file, self.shard_tls_cert_file, self.shard_tls_key_file):
            if path is not None and not path.is_file():
                raise ConfigError(f"{path} does not exist (a {PREFIX}SHARD_TLS_* file)")
        if self.min_in_flight > self.max_in_flight:
            raise ConfigError(f"{PREFIX}MIN_IN_FLIGHT must be <= {PREFIX}MAX_IN_FLIGHT")
        if self.queue_target_ms > self.queue_interval_ms:
            raise ConfigError(f"{PREFIX}QUEUE_TARGET_MS must be <= {PREFIX}QUEUE_INTERVAL_MS")
        if self.slot_map_file is not None and not self.slot_map_file.is_file():
            raise ConfigError(f"{PREFIX}SLOT_MAP_FILE={self.slot_map_file} does not exist")

    @property
    def router_id(self) -> str:
        """The id answered in ``RecommendResponse.router_id``: INSTANCE_ID, else hostname:port."""
        return self.instance_id or f"{socket.gethostname()}:{self.port}"
