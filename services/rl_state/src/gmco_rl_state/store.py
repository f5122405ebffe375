"""What the servicer needs from a state store; implemented for PostgreSQL and SQLite."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from typing import Protocol

from gmco_common.config import ConfigError

from gmco_rl_state.config import PREFIX, Settings
from gmco_rl_state.model import Event, StateRow

# (current row or None, user id, the user's new events in order) -> the row to store.
ApplyFn = Callable[[StateRow | None, str, Sequence[Event]], StateRow]

FINGERPRINT_KEY = "model_fingerprint"


@dataclass(frozen=True)
class UserOutcome:
    """A user's state version after a batch, and how many of its events were new or duplicates."""

    version: int
    applied: int
    duplicates: int


class StateStore(Protocol):
    async def get(self, user_id: str, timeout: float | None) -> StateRow | None:
        """The user's row, or None for a user without state. Raises Unavailable."""

    async def record(self, groups: Mapping[str, Sequence[Event]], apply: ApplyFn) -> dict[str, UserOutcome]:
        """Apply each event exactly once per event_id; a batch commits as one transaction. Raises Unavailable."""


def to_int64(media_id: int) -> int:
    """A uint64 id as the int64 with the same bits (both databases have signed 64-bit integers)."""
    return media_id - (1 << 64) if media_id >= 1 << 63 else media_id


def check_fingerprint(stored: str, wanted: str) -> None:
    if stored != wanted:
        raise ConfigError(
            f"the database holds state for {stored!r} but this process is configured for {wanted!r}: "
            f"set {PREFIX}MEDIA_DIM/BANDIT_DIM/PROJECTION_SEED back, or use a new database"
        )


def open_store(settings: Settings, fingerprint: str) -> AbstractAsyncContextManager[StateStore]:
    """The configured store, as an async context manager that migrates on entry."""
    if settings.backend == "postgres":
        from gmco_rl_state.postgres_store import PostgresStore

        assert settings.postgres_dsn is not None
        return PostgresStore(settings.postgres_dsn, fingerprint, settings.pool_min_size,
                             settings.pool_max_size, settings.db_timeout_seconds)
    from gmco_rl_state.sqlite_store import SqliteStore

    return SqliteStore(settings.sqlite_path, fingerprint)
