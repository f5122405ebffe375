"""Settings of the cache service, read from ``GMCO_CACHE_*`` environment variables."""

from __future__ import annotations

import dataclasses

from gmco_common.config import ConfigError, ServerSettings, port_setting, setting

PREFIX = "GMCO_CACHE_"
BACKENDS = ("memory", "redis", "redis-cluster")


def _positive(v: float) -> bool:
    return v > 0


def parse_nodes(value: tuple[str, ...]) -> list[tuple[str, int]]:
    """``("h1:7000", "h2:7001")`` -> [("h1", 7000), ("h2", 7001)]; raises ConfigError naming the variable."""
    nodes = []
    for item in value:
        host, sep, port = item.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ConfigError(f"{PREFIX}REDIS_NODES: {item!r} is not host:port")
        nodes.append((host, int(port)))
    return nodes


@dataclasses.dataclass(frozen=True)
class Settings(ServerSettings):
    port: int = port_setting(50052)
    backend: str = setting("memory", help="where entries live", choices=BACKENDS)
    redis_url: str = setting("redis://127.0.0.1:6379/0", help="single node (BACKEND=redis)")
    redis_nodes: tuple[str, ...] = setting(
        (), help="cluster startup nodes host:port,host:port (BACKEND=redis-cluster)"
    )
    redis_password: str | None = setting(
        None, help="password (AUTH) for the cluster nodes, or for BACKEND=redis when the URL has none"
    )
    redis_max_connections: int = setting(
        256, help="connection pool limit per Redis node", check=_positive, check_msg="> 0"
    )
    op_timeout_seconds: float = setting(
        0.05, help="a Redis call slower than this is abandoned and answered as a miss (bypass)",
        check=_positive, check_msg="> 0",
    )
    breaker_failures: int = setting(
        5, help="consecutive Redis failures that open the circuit breaker", check=_positive, check_msg="> 0"
    )
    breaker_open_seconds: float = setting(
        1.0, help="time the breaker stays open before one probe call is let through", check=_positive,
        check_msg="> 0",
    )
    rec_ttl_seconds: int = setting(300, help="TTL of cached recommendations", check=_positive, check_msg="> 0")
    user_vector_ttl_seconds: int = setting(
        3600, help="TTL of cached user vectors", check=_positive, check_msg="> 0"
    )
    media_vector_ttl_seconds: int = setting(
        86400, help="TTL of cached media vectors", check=_positive, check_msg="> 0"
    )
    max_value_bytes: int = setting(
        1024 * 1024, help="largest value accepted; larger is INVALID_ARGUMENT", check=_positive, check_msg="> 0"
    )
    max_batch_keys: int = setting(
        10_000, help="most keys in one BatchGet/BatchPut", check=_positive, check_msg="> 0"
    )
    lock_ttl_ms: int = setting(
        2000, help="life of a fill lock taken by GetRecommendations(lock_on_miss)", check=_positive,
        check_msg="> 0",
    )
    lock_wait_seconds: float = setting(
        0.2, help="a caller that finds the fill lock taken waits this long for the value (0 = no wait)",
        check=lambda v: v >= 0, check_msg=">= 0",
    )
    lock_poll_seconds: float = setting(
        0.01, help="poll interval while waiting for another caller's fill", check=_positive, check_msg="> 0"
    )
    memory_max_entries: int = setting(
        1_000_000, help="memory backend: most entries kept (LRU eviction)", check=_positive, check_msg="> 0"
    )
    memory_max_bytes: int = setting(
        512 * 1024 * 1024, help="memory backend: most key+value bytes kept (LRU eviction)", check=_positive,
        check_msg="> 0",
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.backend == "redis-cluster":
            if not self.redis_nodes:
                raise ConfigError(f"{PREFIX}REDIS_NODES is required when {PREFIX}BACKEND=redis-cluster "
                                  "(host:port,host:port of some cluster nodes)")
            parse_nodes(self.redis_nodes)
        if self.backend == "redis" and not self.redis_url.startswith(("redis://", "rediss://", "unix://")):
            raise ConfigError(f"{PREFIX}REDIS_URL={self.redis_url!r} is not a redis://, rediss:// or unix:// URL")

    @property
    def startup_nodes(self) -> list[tuple[str, int]]:
        return parse_nodes(self.redis_nodes)
