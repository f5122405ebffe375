"""The per-user model and how feedback updates it. Pure functions of numpy arrays; no I/O.

State of one user (see README.md for the reasoning):

- ``pref``: long-term preference vector in item space (dimension ``media_dim``), stored as FP16.
  Each event with a positive reward moves it towards the item: ``pref <- unit(pref + rate * r * x)``.
  ``None`` until the first positive event.
- Bayesian linear-regression bandit over ``z = P x``, where ``P`` is a fixed, seeded Gaussian random
  projection to ``bandit_dim`` dimensions: precision ``A = ridge * I + sum z z^T`` and ``b = sum r z``.
  Stored as float32 (``A`` as its packed upper triangle).
- ``seen``: ring of recently seen media ids, most recent first, at most ``seen_capacity`` long.
- ``version`` (bumped once per applied batch) and ``event_count``.

The database stores a :class:`StateRow` (raw column values); :class:`Learner` converts it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from gmco_common.features import feature_version, projection

F16 = np.dtype("<f2")
F32 = np.dtype("<f4")
U64 = np.dtype("<u8")


@dataclass(frozen=True)
class Event:
    """One validated feedback event. ``vector`` is the unit-normalised item embedding, if it came."""

    event_id: str
    user_id: str
    media_id: int
    reward: float
    timestamp_ms: int
    surface: int
    region: str
    device: str
    propensity: float
    vector: np.ndarray | None
    policy: str = ""  # the ranking policy that showed the item ("" = not known)


@dataclass(frozen=True)
class StateRow:
    """A user's state as the stores keep it: raw column values."""

    user_id: str
    version: int
    event_count: int
    pref: bytes | None
    bandit_a: bytes
    bandit_b: bytes
    seen: bytes


@dataclass(frozen=True)
class UserState:
    """A decoded :class:`StateRow`."""

    user_id: str
    version: int
    event_count: int
    pref: np.ndarray | None  # float32 (media_dim,), unit norm
    a: np.ndarray  # float64 (d, d), symmetric positive definite
    b: np.ndarray  # float64 (d,)
    seen: np.ndarray  # uint64, most recent first


@dataclass(frozen=True)
class ModelConfig:
    media_dim: int
    bandit_dim: int
    projection_seed: int
    ridge: float
    preference_rate: float
    seen_capacity: int

    def fingerprint(self) -> str:
        """What stored states depend on; a store refuses to open with a different one."""
        return f"media_dim={self.media_dim};bandit_dim={self.bandit_dim};projection_seed={self.projection_seed}"


class Learner:
    """Projection, (de)serialisation and the feedback update."""

    def __init__(self, config: ModelConfig) -> None:
        self.config = config
        d = config.bandit_dim
        # The Gaussian JL projection the shards compute candidate features with (gmco_common.features).
        self.projection = projection(config.media_dim, d, config.projection_seed)
        self.feature_version = feature_version(config.media_dim, d, config.projection_seed)
        self._triu = np.triu_indices(d)

    @property
    def dim(self) -> int:
        return self.config.bandit_dim

    def project(self, vectors: np.ndarray) -> np.ndarray:
        """(n, media_dim) unit item vectors -> (n, d) float64 bandit features."""
        return (np.asarray(vectors, dtype=np.float32) @ self.projection).astype(np.float64)

    # --- (de)serialisation ------------------------------------------------------------------------
    def decode(self, row: StateRow) -> UserState:
        d = self.dim
        packed = np.frombuffer(row.bandit_a, dtype=F32).astype(np.float64)
        a = np.zeros((d, d))
        a[self._triu] = packed
        a = a + np.triu(a, 1).T
        pref = None if row.pref is None else np.frombuffer(row.pref, dtype=F16).astype(np.float32)
        return UserState(
            user_id=row.user_id,
            version=row.version,
            event_count=row.event_count,
            pref=pref,
            a=a,
            b=np.frombuffer(row.bandit_b, dtype=F32).astype(np.float64),
            seen=np.frombuffer(row.seen, dtype=U64),
        )

    def encode(self, state: UserState) -> StateRow:
        return StateRow(
            user_id=state.user_id,
            version=state.version,
            event_count=state.event_count,
            pref=None if state.pref is None else state.pref.astype(F16).tobytes(),
            bandit_a=state.a[self._triu].astype(F32).tobytes(),
            bandit_b=state.b.astype(F32).tobytes(),
            seen=np.ascontiguousarray(state.seen, dtype=U64).tobytes(),
        )

    def fresh(self, user_id: str) -> UserState:
        """The state of a user before any feedback (also what cold start means)."""
        d = self.dim
        return UserState(user_id, 0, 0, None, self.config.ridge * np.eye(d), np.zeros(d), np.zeros(0, dtype=U64))

    # --- the update ---------------------------------------------------------------------------------
    def apply(self, row: StateRow | None, user_id: str, events: Sequence[Event]) -> StateRow:
        """The state after ``events`` (new ones only, in order); version + 1."""
        state = self.fresh(user_id) if row is None else self.decode(row)
        pref = None if state.pref is None else state.pref.copy()
        a, b = state.a.copy(), state.b.copy()
        learn = [e for e in events if e.vector is not None]
        if learn:
            x = np.stack([e.vector for e in learn])
            r = np.array([e.reward for e in learn], dtype=np.float64)
            z = self.project(x)
            a += z.T @ z
            b += z.T @ r
            rate = self.config.preference_rate
            for xi, ri in zip(x, r, strict=True):
                if ri > 0:
                    pref = _unit(xi.astype(np.float32) if pref is None else pref + rate * ri * xi)
        seen = _push_seen(state.seen, [e.media_id for e in events], self.config.seen_capacity)
        return self.encode(UserState(user_id, state.version + 1, state.event_count + len(events), pref, a, b, seen))


def _unit(v: np.ndarray) -> np.ndarray:
    n = float(np.linalg.norm(v))
    return v / n if n > 0 else v


def _push_seen(seen: np.ndarray, media_ids: Sequence[int], capacity: int) -> np.ndarray:
    """Most recent first, no repeats, at most ``capacity``."""
    out: list[int] = []
    taken: set[int] = set()
    for m in [*reversed(media_ids), *seen.tolist()]:
        if m not in taken:
            taken.add(m)
            out.append(m)
            if len(out) == capacity:
                break
    return np.array(out, dtype=U64)
