"""What the servicer needs from a state store; implemented for PostgreSQL (``postgres_store``) and SQLite
(``sqlite_store``), opened by ``app.open_store``.

Exactly-once feedback, in one place: every event carries a client-chosen ``event_id``, and the
``feedback_event`` table (``migrations/<dialect>/0001_init.sql``) has it as its primary key. ``record``
reads which of a batch's ids are logged already, applies only the new events to the user's row
(``model.Learner.apply``), and writes the new row together with ``INSERT ... ON CONFLICT (event_id) DO
NOTHING`` of the events, in one transaction: either both the state change and the idempotency record
commit, or neither. PostgreSQL guards the row with an optimistic version check (a concurrent writer makes
the statement write nothing, and the user is retried); SQLite serialises writers on one thread.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

from gmco_common.config import ConfigError

from gmco_rl_state.model import Event, StateRow

# (current row or None, user id, the user's new events in order) -> the row to store.
ApplyFn = Callable[[StateRow | None, str, Sequence[Event]], StateRow]

FINGERPRINT_KEY = "model_fingerprint"
FINGERPRINT_HINT = "GMCO_RL_STATE_MEDIA_DIM/BANDIT_DIM/PROJECTION_SEED"


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


def check_fingerprint(stored: str, wanted: str) -> None:
    if stored != wanted:
        raise ConfigError(
            f"the database holds state for {stored!r} but this process is configured for {wanted!r}: "
            f"set {FINGERPRINT_HINT} back, or use a new database"
        )
