"""Settings of the rl_state service, read from ``GMCO_RL_STATE_*`` environment variables."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from gmco_common.config import ConfigError, ServerSettings, port_setting, setting
from gmco_common.features import DEFAULT_DIM, DEFAULT_SEED

PREFIX = "GMCO_RL_STATE_"


def _positive(v: float) -> bool:
    return v > 0


@dataclasses.dataclass(frozen=True)
class Settings(ServerSettings):
    port: int = port_setting(50054)
    backend: str = setting("sqlite", help="state store", choices=("sqlite", "postgres"))
    postgres_dsn: str | None = setting(None, help="libpq DSN/URI; required when BACKEND=postgres")
    pool_min_size: int = setting(2, help="PostgreSQL connections kept open", check=_positive, check_msg="> 0")
    pool_max_size: int = setting(10, help="PostgreSQL connection pool limit", check=_positive, check_msg="> 0")
    db_timeout_seconds: float = setting(
        2.0, help="longest wait for a database connection", check=_positive, check_msg="> 0"
    )
    sqlite_path: Path = setting(Path(".run/rl_state.sqlite3"), help="SQLite file (':memory:' for tests)")
    sqlite_cache_entries: int = setting(
        4096, help="user states the SQLite store keeps in memory (about 6 KB each), so that Rank and GetUserState "
        "for a recent user skip the database thread's round trip; exact because the file belongs to this one "
        "process, whose own writes refresh the copies (0 = off)", check=lambda v: v >= 0, check_msg=">= 0")
    media_dim: int = setting(1024, help="dimension of item embeddings", check=_positive, check_msg="> 0")
    bandit_dim: int = setting(
        DEFAULT_DIM, help="bandit dimension d (random projection of item vectors; GMCO_SHARD_FEATURE_DIM must match)",
        check=lambda v: 16 <= v <= 32, check_msg="must be in 16..32",
    )
    projection_seed: int = setting(DEFAULT_SEED, help="seed of the fixed random projection (the shards' "
                                   "GMCO_SHARD_FEATURE_SEED must match)", check=lambda v: 0 <= v < 2**63,
                                   check_msg="0..2^63-1 (a numpy seed)")
    policy: str = setting(
        "thompson", help="ranking policy for users with state; greedy = no exploration",
        choices=("thompson", "greedy"),
    )
    prior_scale: float = setting(
        0.05, help="Thompson sampling: posterior scale v (more = more exploration)", check=_positive,
        check_msg="> 0",
    )
    ridge: float = setting(1.0, help="bandit ridge prior lambda", check=_positive, check_msg="> 0")
    preference_rate: float = setting(
        0.2, help="step of the preference vector towards positively rewarded items",
        check=lambda v: 0 < v <= 1, check_msg="must be in (0, 1]",
    )
    preference_weight: float = setting(
        1.0, help="weight of cos(preference, item) in the ranking score", check=lambda v: v >= 0,
        check_msg=">= 0",
    )
    seen_capacity: int = setting(200, help="size of the recently-seen ring", check=_positive, check_msg="> 0")
    propensity_samples: int = setting(
        64, help="Monte Carlo posterior samples used to estimate propensities", check=_positive,
        check_msg="> 0",
    )
    cold_start_temperature: float = setting(
        0.1, help="softmax temperature of the cold-start policy", check=_positive, check_msg="> 0"
    )
    diversity_lambda: float = setting(
        1.0, help="MMR diversity re-ranking in Rank: weight of relevance against similarity to the items above, "
        "in (0, 1]; 1 = off, 0.7 = a mild trade-off (see docs/benchmarks.md)",
        check=lambda v: 0 < v <= 1, check_msg="must be in (0, 1]",
    )
    experiments_file: Path | None = setting(
        None, help="policy experiments (JSON, or YAML): arms, weights, canary, guard; watched and reloaded "
        "without a restart (docs/experiments.md)",
    )
    experiments_poll_seconds: float = setting(
        5.0, help="how often the experiments file is checked for changes and the canary guard runs",
        check=_positive, check_msg="> 0",
    )
    rank_state_timeout_seconds: float = setting(
        0.25, help="Rank waits this long for the state, then answers cold start (degraded)",
        check=_positive, check_msg="> 0",
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.backend == "postgres" and not self.postgres_dsn:
            raise ConfigError(f"{PREFIX}POSTGRES_DSN is required when {PREFIX}BACKEND=postgres")
        if self.pool_min_size > self.pool_max_size:
            raise ConfigError(f"{PREFIX}POOL_MIN_SIZE must not exceed {PREFIX}POOL_MAX_SIZE")
