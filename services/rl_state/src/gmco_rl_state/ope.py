"""Off-policy evaluation (OPE): the value of a target ranking policy, estimated from what another policy logged.

Run it on the rl_state store: ``python -m gmco_rl_state.ope --help``.

The log
-------
One row per impression (:class:`LoggedData`): the action shown (an index into an action space of
``n_actions`` items), its position in the ranked list (0 = top), the reward observed, and the logging
policy's propensity for that action at that position. Optional: context features (for the reward model),
and a slate id shared by the rows of one ranked list.

The value estimated is the target policy's **expected reward per impression**: the mean reward over rows,
had the target policy chosen each row's item. (Per list: multiply by the list length.)

The target policy
-----------------
A :data:`TargetPolicy` is a function of the log that returns an ``(n, n_actions)`` array ``pi``:
``pi[i, a]`` is the probability that the target shows action ``a`` at row ``i``'s position in row ``i``'s
context. Rows sum to at most 1. What "at row i's position" conditions on depends on the weighting:

- ``weighting="independent"`` (the default): ``pi[i, a]`` is the *marginal* probability that ``a`` is at
  that position, and the row's propensity must be the logging policy's marginal one. The row's importance
  weight is ``w_i = pi[i, a_i] / propensity_i``. This is the independent-IPS (position-based) estimator
  (Li et al. 2018, "Offline evaluation of ranking policies with click models"): unbiased when a row's
  reward depends only on the item at that position (a position-based click model), whatever the items
  around it. The Open Bandit Dataset logs these marginal propensities.
- ``weighting="cascade"``: ``pi[i, a]`` is the probability of ``a`` at that position *given the items
  logged above it in the same slate*, and the propensity is the logging policy's conditional one (what
  ``gmco_rl_state.policy`` documents for ``Rank``). The weight of the row at position ``k`` is the product
  of the per-position ratios over positions ``0..k`` of its slate (the reward-interaction / cascade IPS
  of McInerney et al. 2020, Kiyohara et al. 2022): unbiased when a row's reward depends on the items at
  and above its position. Needs ``slate`` and every slate's positions ``0..len-1`` in the log.

For ``position == 0`` both readings coincide.

Estimators (each with a bootstrap percentile interval)
------------------------------------------------------
With ``w_i`` the row weight, ``w_prev_i`` the weight of the prefix above the row (1 for independent),
``q(i, a)`` a reward model's prediction and ``dm_i = sum_a pi[i, a] q(i, a)``:

- ``ips``: ``mean(w r)``; unbiased where the logger covers the target's actions.
- ``clipped_ips``: ``mean(min(w, clip) r)``; less variance, biased downwards when weights exceed ``clip``.
- ``snips``: ``sum(w r) / sum(w)``; self-normalised, slightly biased, usually much less variance.
- ``dm``: ``mean(dm_i)``; the reward model alone (for cascade: the last position modelled, the logged
  prefix kept). Low variance, biased as far as the model is wrong.
- ``dr``: ``mean(w_prev dm + w (r - q(i, a_i)))``; doubly robust: unbiased if either the propensities or
  the model are right. (For cascade, this is the cascade-DR of Kiyohara et al. 2022.)

Reward models: :class:`MeanRewardModel` (per action and position mean, shrunk towards the position's mean)
and :class:`RidgeRewardModel` (ridge regression on context features plus action and position effects).
The bootstrap resamples rows (whole slates when ``slate`` is given) and refits the reward model on each
resample, so the intervals of ``dm`` and ``dr`` include the model's own sampling error.

Diagnostics (:class:`Diagnostics`): the effective sample size ``(sum w)^2 / sum w^2`` (Kish), the largest
and the mean importance weight (the mean should be near 1; far below 1 means the target puts mass where
the logger never went), the share of rows whose weight was clipped, and the share of the target's
probability mass on actions the logger never took at that position (no estimator can learn about those
from this log; ``ips`` then underestimates and ``snips`` rescales what it saw).

The rl_state store today
------------------------
``feedback_event`` holds media id, reward, propensity, time, surface, region, device, user and the policy
that showed the item (``policy``, migration 0002; ``--policy`` selects one arm of an experiment), but no
position or slate: every event is then read as position 0 (exact for the top item; for the others the
logged propensity is conditional on items the log does not hold). When the table gains ``position``
(smallint, 0 = top) and ``slate_id`` (text: the Rank call's id) columns, :func:`read_feedback` reads them and
the CLI offers ``--weighting cascade``.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sqlite3
import sys
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import psycopg
from gmco_common.ids import from_int64

INDEPENDENT = "independent"
CASCADE = "cascade"
ESTIMATORS = ("ips", "clipped_ips", "snips", "dm", "dr")


# --- the log ------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class LoggedData:
    """Logged impressions: one row per shown item. See the module docstring."""

    action: np.ndarray  # (n,) int, in [0, n_actions)
    reward: np.ndarray  # (n,) float
    propensity: np.ndarray  # (n,) float in (0, 1]: the logger's probability of the row's action there
    n_actions: int
    position: np.ndarray | None = None  # (n,) int, 0 = top; None = all 0
    context: np.ndarray | None = None  # (n, d) float features (reward model, target policy)
    slate: np.ndarray | None = None  # (n,) int, the ranked list a row belongs to
    action_ids: np.ndarray | None = None  # (n_actions,) external ids (media ids) of the actions
    meta: dict[str, np.ndarray] = field(default_factory=dict)  # other per-row columns, for target policies

    def __post_init__(self) -> None:
        n = len(self.action)
        object.__setattr__(self, "action", np.asarray(self.action, dtype=np.int64))
        object.__setattr__(self, "reward", np.asarray(self.reward, dtype=np.float64))
        object.__setattr__(self, "propensity", np.asarray(self.propensity, dtype=np.float64))
        pos = np.zeros(n, dtype=np.int64) if self.position is None else np.asarray(self.position, dtype=np.int64)
        object.__setattr__(self, "position", pos)
        if self.slate is not None:
            object.__setattr__(self, "slate", np.asarray(self.slate, dtype=np.int64))
        if self.context is not None:
            object.__setattr__(self, "context", np.asarray(self.context, dtype=np.float64))
        if n == 0:
            raise ValueError("the log is empty")
        for name in ("reward", "propensity", "position"):
            if len(getattr(self, name)) != n:
                raise ValueError(f"{name} has {len(getattr(self, name))} rows; action has {n}")
        if self.slate is not None and len(self.slate) != n:
            raise ValueError(f"slate has {len(self.slate)} rows; action has {n}")
        if self.context is not None and (self.context.ndim != 2 or len(self.context) != n):
            raise ValueError(f"context must be ({n}, d); it is {self.context.shape}")
        if self.action.min() < 0 or self.action.max() >= self.n_actions:
            raise ValueError(f"actions must be in [0, {self.n_actions})")
        if not (np.all(self.propensity > 0) and np.all(self.propensity <= 1)):
            raise ValueError("propensities must be in (0, 1]; drop rows with unknown (0) propensity first")
        if not np.all(np.isfinite(self.reward)):
            raise ValueError("rewards must be finite")
        if pos.min() < 0:
            raise ValueError("positions must be >= 0")

    @property
    def n(self) -> int:
        return len(self.action)

    @property
    def n_positions(self) -> int:
        return int(self.position.max()) + 1


# (log) -> (n, n_actions) probabilities of each action at each row's position; see the module docstring.
TargetPolicy = Callable[[LoggedData], np.ndarray]


def position_policy(dist: np.ndarray) -> TargetPolicy:
    """A context-free target: ``dist[a, k]`` is the probability of action ``a`` at position ``k``
    (positions past the last column use the last column)."""
    dist = np.asarray(dist, dtype=np.float64)
    if dist.ndim == 1:
        dist = dist[:, None]

    def target(data: LoggedData) -> np.ndarray:
        if dist.shape[0] != data.n_actions:
            raise ValueError(f"the target covers {dist.shape[0]} actions; the log has {data.n_actions}")
        return dist[:, np.minimum(data.position, dist.shape[1] - 1)].T

    return target


def uniform_policy(data: LoggedData) -> np.ndarray:
    """Every action equally likely at every position."""
    return np.full((data.n, data.n_actions), 1.0 / data.n_actions)


# --- reward models ------------------------------------------------------------------------------------
class FittedRewardModel(Protocol):
    def at_logged(self) -> np.ndarray:
        """(n,) predicted reward of each row's logged action, in its context and position."""

    def expected(self, pi: np.ndarray) -> np.ndarray:
        """(n,) ``sum_a pi[i, a] * q(i, a)``: the predicted reward of the target's choice at row ``i``."""


class RewardModel(Protocol):
    def fit(self, data: LoggedData, sample_weight: np.ndarray) -> FittedRewardModel:
        """Fit on ``data`` with per-row weights (bootstrap multiplicities); predict for the same rows."""


@dataclass(frozen=True)
class MeanRewardModel:
    """``q(a, k)``: the mean reward of action ``a`` at position ``k`` (or over all positions), shrunk towards
    the position's mean with ``prior_strength`` pseudo-impressions: ``(sum r + m * mean_k) / (count + m)``."""

    by_position: bool = True
    prior_strength: float = 1.0

    def fit(self, data: LoggedData, sample_weight: np.ndarray) -> _FittedTable:
        k = data.n_positions if self.by_position else 1
        pos = data.position if self.by_position else np.zeros(data.n, dtype=np.int64)
        cell = data.action * k + pos
        size = data.n_actions * k
        count = np.bincount(cell, weights=sample_weight, minlength=size).reshape(data.n_actions, k)
        total = np.bincount(cell, weights=sample_weight * data.reward, minlength=size).reshape(data.n_actions, k)
        pos_count, pos_total = count.sum(axis=0), total.sum(axis=0)
        prior = np.divide(pos_total, pos_count, out=np.zeros(k), where=pos_count > 0)
        table = (total + self.prior_strength * prior) / (count + self.prior_strength)
        table[:, pos_count == 0] = 0.0
        return _FittedTable(table, data.action, pos)


@dataclass(frozen=True)
class _FittedTable:
    table: np.ndarray  # (n_actions, k)
    action: np.ndarray
    pos: np.ndarray

    def at_logged(self) -> np.ndarray:
        return self.table[self.action, self.pos]

    def expected(self, pi: np.ndarray) -> np.ndarray:
        out = np.empty(len(self.pos))
        for k in range(self.table.shape[1]):
            rows = self.pos == k
            out[rows] = pi[rows] @ self.table[:, k]
        return out


@dataclass(frozen=True)
class RidgeRewardModel:
    """``q(x, a, k) = x . beta + beta_a + beta_k + b``: ridge regression (penalty ``alpha``, intercept not
    penalised) on the context features with additive action and position effects."""

    alpha: float = 1.0

    def fit(self, data: LoggedData, sample_weight: np.ndarray) -> _FittedLinear:
        n, k, a = data.n, data.n_positions, data.n_actions
        x = data.context if data.context is not None else np.zeros((n, 0))
        d = x.shape[1]
        # design: [1, x, one-hot position, one-hot action]; built blockwise to keep one-hots implicit
        dim = 1 + d + k + a
        sw = sample_weight
        gram = np.zeros((dim, dim))
        rhs = np.zeros(dim)
        pos_cols, act_cols = 1 + d + data.position, 1 + d + k + data.action
        xw = x * sw[:, None]
        gram[0, 0] = sw.sum()
        gram[0, 1:1 + d] = xw.sum(axis=0)
        gram[1:1 + d, 1:1 + d] = x.T @ xw
        pos_w = np.bincount(data.position, weights=sw, minlength=k)
        act_w = np.bincount(data.action, weights=sw, minlength=a)
        gram[0, 1 + d:1 + d + k] = pos_w
        gram[0, 1 + d + k:] = act_w
        gram[1 + d + np.arange(k), 1 + d + np.arange(k)] = pos_w
        gram[1 + d + k + np.arange(a), 1 + d + k + np.arange(a)] = act_w
        for j in range(d):
            gram[1 + j, 1 + d:1 + d + k] = np.bincount(data.position, weights=xw[:, j], minlength=k)
            gram[1 + j, 1 + d + k:] = np.bincount(data.action, weights=xw[:, j], minlength=a)
        np.add.at(gram, (pos_cols, act_cols), sw)
        gram = np.triu(gram) + np.triu(gram, 1).T
        ry = sw * data.reward
        rhs[0] = ry.sum()
        rhs[1:1 + d] = x.T @ ry
        rhs[1 + d:1 + d + k] = np.bincount(data.position, weights=ry, minlength=k)
        rhs[1 + d + k:] = np.bincount(data.action, weights=ry, minlength=a)
        penalty = np.full(dim, self.alpha)
        penalty[0] = 1e-9
        coef = np.linalg.solve(gram + np.diag(penalty), rhs)
        base = coef[0] + x @ coef[1:1 + d] + coef[1 + d:1 + d + k][data.position]
        return _FittedLinear(base, coef[1 + d + k:], data.action)


@dataclass(frozen=True)
class _FittedLinear:
    base: np.ndarray  # (n,) intercept + context + position part
    action_effect: np.ndarray  # (n_actions,)
    action: np.ndarray

    def at_logged(self) -> np.ndarray:
        return self.base + self.action_effect[self.action]

    def expected(self, pi: np.ndarray) -> np.ndarray:
        return pi.sum(axis=1) * self.base + pi @ self.action_effect


# --- weights ------------------------------------------------------------------------------------------
def importance_weights(data: LoggedData, pi: np.ndarray, weighting: str = INDEPENDENT) -> tuple[np.ndarray,
                                                                                               np.ndarray]:
    """``(w, w_prev)``: each row's importance weight and the weight of the prefix above it (1 for
    independent weighting). See the module docstring."""
    ratio = pi[np.arange(data.n), data.action] / data.propensity
    if weighting == INDEPENDENT:
        return ratio, np.ones(data.n)
    if weighting != CASCADE:
        raise ValueError(f"weighting must be {INDEPENDENT!r} or {CASCADE!r}, not {weighting!r}")
    if data.slate is None:
        raise ValueError("cascade weighting needs the slate id of every row")
    order = np.lexsort((data.position, data.slate))
    slate, pos = data.slate[order], data.position[order]
    starts = np.r_[True, slate[1:] != slate[:-1]]
    rank = np.arange(data.n) - np.maximum.accumulate(np.where(starts, np.arange(data.n), 0))
    if np.any(pos != rank):
        raise ValueError("cascade weighting needs each slate's positions 0..len-1, once each")
    w_sorted = ratio[order].copy()
    prev_sorted = np.ones(data.n)
    for k in range(1, data.n_positions):
        at_k = np.flatnonzero(pos == k)
        prev_sorted[at_k] = w_sorted[at_k - 1]
        w_sorted[at_k] *= prev_sorted[at_k]
    w, w_prev = np.empty(data.n), np.empty(data.n)
    w[order], w_prev[order] = w_sorted, prev_sorted
    return w, w_prev


# --- the report ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Estimate:
    value: float
    ci_low: float
    ci_high: float
    se: float  # standard deviation of the bootstrap replicates


@dataclass(frozen=True)
class Diagnostics:
    n: int
    n_slates: int | None
    ess: float  # (sum w)^2 / sum w^2
    ess_fraction: float
    max_weight: float
    mean_weight: float
    clipped_share: float  # rows whose weight exceeded the clip
    unsupported_target_mass: float  # mean target probability on actions never logged at the row's position
    rows_with_zero_weight: float  # share of rows where the target never takes the logged action


@dataclass(frozen=True)
class OPEReport:
    estimates: dict[str, Estimate]
    diagnostics: Diagnostics
    logging_value: Estimate  # the mean logged reward (the logging policy's on-policy value), same bootstrap
    weighting: str
    clip: float
    confidence: float
    n_bootstrap: int
    reward_model: str

    def to_dict(self) -> dict[str, Any]:
        return {"estimates": {k: asdict(v) for k, v in self.estimates.items()},
                "logging_value": asdict(self.logging_value), "diagnostics": asdict(self.diagnostics),
                "weighting": self.weighting, "clip": self.clip, "confidence": self.confidence,
                "n_bootstrap": self.n_bootstrap, "reward_model": self.reward_model}


# --- estimation ---------------------------------------------------------------------------------------
def _check_pi(pi: np.ndarray, data: LoggedData) -> np.ndarray:
    pi = np.asarray(pi, dtype=np.float64)
    if pi.shape != (data.n, data.n_actions):
        raise ValueError(f"the target policy returned shape {pi.shape}; expected ({data.n}, {data.n_actions})")
    if not np.all(np.isfinite(pi)) or pi.min() < 0 or pi.max() > 1:
        raise ValueError("the target policy's probabilities must be finite and in [0, 1]")
    if np.any(pi.sum(axis=1) > 1 + 1e-6):
        raise ValueError("the target policy's probabilities sum to more than 1 in some rows")
    return pi


def _point(data: LoggedData, w: np.ndarray, w_prev: np.ndarray, pi: np.ndarray, c: np.ndarray, clip: float,
           model: RewardModel) -> dict[str, float]:
    """Every estimator with per-row multiplicities ``c`` (ones: the estimate; a resample: a replicate)."""
    r = data.reward
    total = c.sum()
    wr = c * w * r
    fitted = model.fit(data, c)
    q_logged, dm = fitted.at_logged(), fitted.expected(pi)
    sw = float(np.dot(c, w))
    return {
        "ips": float(wr.sum() / total),
        "clipped_ips": float(np.dot(c, np.minimum(w, clip) * r) / total),
        "snips": float(wr.sum() / sw) if sw > 0 else float("nan"),
        "dm": float(np.dot(c, dm) / total),
        "dr": float(np.dot(c, w_prev * dm + w * (r - q_logged)) / total),
        "logging": float(np.dot(c, r) / total),
    }


def _resampling_units(data: LoggedData) -> np.ndarray:
    """The unit of each row for the bootstrap: the row itself, or its slate when the log has slates."""
    if data.slate is None:
        return np.arange(data.n)
    return np.unique(data.slate, return_inverse=True)[1]


def _resample_counts(units: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Bootstrap multiplicity of each row: its unit's number of draws in a resample of the units."""
    m = int(units.max()) + 1
    return np.bincount(rng.integers(0, m, m), minlength=m)[units].astype(np.float64)


def diagnostics(data: LoggedData, pi: np.ndarray, w: np.ndarray, clip: float) -> Diagnostics:
    k = data.n_positions
    logged = np.zeros((data.n_actions, k), dtype=bool)
    logged[data.action, data.position] = True
    unsupported = np.einsum("ia,ai->i", pi, ~logged[:, data.position])
    sw, sw2 = float(w.sum()), float(np.dot(w, w))
    ess = sw * sw / sw2 if sw2 > 0 else 0.0
    return Diagnostics(
        n=data.n, n_slates=None if data.slate is None else len(np.unique(data.slate)),
        ess=ess, ess_fraction=ess / data.n, max_weight=float(w.max()), mean_weight=float(w.mean()),
        clipped_share=float(np.mean(w > clip)), unsupported_target_mass=float(unsupported.mean()),
        rows_with_zero_weight=float(np.mean(w == 0)),
    )


def evaluate(data: LoggedData, target: TargetPolicy | np.ndarray, *, weighting: str = INDEPENDENT,
             clip: float = 100.0, reward_model: RewardModel | None = None, n_bootstrap: int = 1000,
             confidence: float = 0.95, seed: int = 0) -> OPEReport:
    """Estimate the target policy's value per impression with every estimator, and its diagnostics.

    ``target``: a :data:`TargetPolicy`, or its ``(n, n_actions)`` output. Intervals are bootstrap
    percentile intervals at ``confidence`` over ``n_bootstrap`` resamples (rows, or slates when given).
    """
    if not 0 < confidence < 1:
        raise ValueError("confidence must be in (0, 1)")
    if clip <= 0:
        raise ValueError("clip must be > 0")
    if n_bootstrap < 2:
        raise ValueError("n_bootstrap must be >= 2")
    model = reward_model or MeanRewardModel()
    pi = _check_pi(target(data) if callable(target) else target, data)
    w, w_prev = importance_weights(data, pi, weighting)
    point = _point(data, w, w_prev, pi, np.ones(data.n), clip, model)
    rng = np.random.default_rng(seed)
    units = _resampling_units(data)
    reps = {name: np.empty(n_bootstrap) for name in point}
    for b in range(n_bootstrap):
        for name, value in _point(data, w, w_prev, pi, _resample_counts(units, rng), clip, model).items():
            reps[name][b] = value
    lo_q, hi_q = (1 - confidence) / 2, 1 - (1 - confidence) / 2

    def summary(name: str) -> Estimate:
        values = reps[name][np.isfinite(reps[name])]
        if len(values) == 0:
            return Estimate(point[name], float("nan"), float("nan"), float("nan"))
        return Estimate(point[name], float(np.quantile(values, lo_q)), float(np.quantile(values, hi_q)),
                        float(values.std(ddof=1)) if len(values) > 1 else 0.0)

    return OPEReport({name: summary(name) for name in ESTIMATORS}, diagnostics(data, pi, w, clip),
                     summary("logging"), weighting, clip, confidence, n_bootstrap, type(model).__name__)


# --- the rl_state store -------------------------------------------------------------------------------
@dataclass(frozen=True)
class FeedbackLog:
    """``feedback_event`` rows as arrays (optional columns None when the table lacks them)."""

    user_id: np.ndarray  # object (str)
    media_id: np.ndarray  # uint64
    reward: np.ndarray
    propensity: np.ndarray
    event_ts_ms: np.ndarray
    surface: np.ndarray
    region: np.ndarray  # object (str)
    device: np.ndarray  # object (str)
    position: np.ndarray | None = None
    slate_id: np.ndarray | None = None  # object (str)
    policy: np.ndarray | None = None  # object (str)

    def __len__(self) -> int:
        return len(self.media_id)


_BASE_COLUMNS = ("user_id", "media_id", "reward", "propensity", "event_ts_ms", "surface", "region", "device")
_OPTIONAL_COLUMNS = ("position", "slate_id", "policy")


def is_postgres(db: str) -> bool:
    return db.startswith(("postgresql://", "postgres://")) or "dbname=" in db or "host=" in db


def read_feedback(db: str, *, since_ms: int | None = None, until_ms: int | None = None,
                  surface: int | None = None, policy: str | None = None, limit: int | None = None) -> FeedbackLog:
    """Read the feedback log from a SQLite file or a PostgreSQL DSN/URI, oldest first."""
    where, params = [], []
    if since_ms is not None:
        where.append("event_ts_ms >= {p}")
        params.append(since_ms)
    if until_ms is not None:
        where.append("event_ts_ms < {p}")
        params.append(until_ms)
    if surface is not None:
        where.append("surface = {p}")
        params.append(surface)
    postgres = is_postgres(db)
    if postgres:
        with psycopg.connect(db, autocommit=True) as conn:
            present = {r[0] for r in conn.execute(
                "SELECT column_name FROM information_schema.columns WHERE table_name = 'feedback_event'")}
            rows, columns = _select(conn, present, where, params, policy, limit, "%s")
    else:
        path = Path(db)
        if not path.exists():
            raise FileNotFoundError(f"no rl_state SQLite database at {path}")
        conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
        try:
            present = {r[1] for r in conn.execute("PRAGMA table_info(feedback_event)")}
            rows, columns = _select(conn, present, where, params, policy, limit, "?")
        finally:
            conn.close()
    cols = list(zip(*rows, strict=True)) if rows else [()] * len(columns)
    data = dict(zip(columns, cols, strict=True))

    def arr(name: str, dtype: Any) -> np.ndarray:
        return np.asarray(data[name], dtype=dtype)

    return FeedbackLog(
        user_id=arr("user_id", object), media_id=np.asarray([from_int64(int(m)) for m in data["media_id"]],
                                                            dtype=np.uint64),
        reward=arr("reward", np.float64), propensity=arr("propensity", np.float64),
        event_ts_ms=arr("event_ts_ms", np.int64), surface=arr("surface", np.int64),
        region=arr("region", object), device=arr("device", object),
        position=arr("position", np.int64) if "position" in data else None,
        slate_id=arr("slate_id", object) if "slate_id" in data else None,
        policy=arr("policy", object) if "policy" in data else None,
    )


def _select(conn: Any, present: set[str], where: list[str], params: list[Any], policy: str | None,
            limit: int | None, mark: str) -> tuple[list[tuple], list[str]]:
    missing = [c for c in _BASE_COLUMNS if c not in present]
    if missing:
        raise ValueError(f"feedback_event lacks columns {missing}: is this an rl_state database?")
    columns = [*_BASE_COLUMNS, *(c for c in _OPTIONAL_COLUMNS if c in present)]
    where, params = list(where), list(params)
    if policy is not None:
        if "policy" not in present:
            raise ValueError("--policy: this feedback_event table has no policy column")
        where.append("policy = {p}")
        params.append(policy)
    sql = f"SELECT {', '.join(columns)} FROM feedback_event"
    if where:
        sql += " WHERE " + " AND ".join(w.format(p=mark) for w in where)
    sql += " ORDER BY event_ts_ms, event_id"
    if limit is not None:
        sql += f" LIMIT {int(limit)}"
    return list(conn.execute(sql, params).fetchall()), columns


def logged_data(log: FeedbackLog, extra_actions: Sequence[int] = ()) -> tuple[LoggedData, int]:
    """The log as :class:`LoggedData`: actions are the distinct media ids (plus ``extra_actions``, e.g. items
    only the target shows), context is one-hot surface/region/device, slates from ``slate_id``. Rows with an
    unknown (0) propensity are dropped; returns the log and how many were dropped."""
    known = log.propensity > 0
    dropped = int(np.count_nonzero(~known))
    if not known.any():
        raise ValueError("no feedback event in the selection has a known (non-zero) propensity")
    ids = np.unique(np.concatenate([log.media_id[known], np.asarray(extra_actions, dtype=np.uint64)]))
    action = np.searchsorted(ids, log.media_id[known])
    features = []
    for column in (log.surface, log.region, log.device):
        values = column[known]
        levels = np.unique(values.astype(str))
        if len(levels) > 1:
            features.append((values.astype(str)[:, None] == levels[None, 1:]).astype(np.float64))
    context = np.hstack(features) if features else None
    slate = None
    if log.slate_id is not None:
        _, slate = np.unique(log.slate_id[known].astype(str), return_inverse=True)
    meta = {"user_id": log.user_id[known], "surface": log.surface[known], "region": log.region[known],
            "device": log.device[known], "event_ts_ms": log.event_ts_ms[known], "media_id": log.media_id[known]}
    data = LoggedData(action=action, reward=log.reward[known], propensity=log.propensity[known],
                      n_actions=len(ids), position=None if log.position is None else log.position[known],
                      context=context, slate=slate, action_ids=ids, meta=meta)
    return data, dropped


# --- target policies for the command line --------------------------------------------------------------
def json_policy(path: Path) -> tuple[TargetPolicy, list[int]]:
    """A context-free target from a JSON file: ``{"distribution": {"<media_id>": p, ...}}`` for every position,
    or ``{"by_position": [{...}, {...}]}`` (position 0 first; later positions use the last). Returns the policy
    and the media ids it names (so that the action space includes those the logger never showed)."""
    doc = json.loads(path.read_text())
    if "by_position" in doc:
        tables = doc["by_position"]
    elif "distribution" in doc:
        tables = [doc["distribution"]]
    else:
        raise ValueError(f"{path}: expected a 'distribution' or 'by_position' key")
    if not isinstance(tables, list) or not tables or not all(isinstance(t, dict) for t in tables):
        raise ValueError(f"{path}: by_position must be a non-empty list of {{media_id: probability}} objects")
    parsed = [{int(k): float(v) for k, v in t.items()} for t in tables]
    for k, t in enumerate(parsed):
        if any(p < 0 for p in t.values()) or sum(t.values()) > 1 + 1e-6:
            raise ValueError(f"{path}: position {k}: probabilities must be >= 0 and sum to at most 1")
    named = sorted({m for t in parsed for m in t})

    def target(data: LoggedData) -> np.ndarray:
        if data.action_ids is None:
            raise ValueError("a media-id target needs the log's action_ids")
        dist = np.zeros((data.n_actions, len(parsed)))
        for k, t in enumerate(parsed):
            idx = np.searchsorted(data.action_ids, np.asarray(list(t), dtype=np.uint64))
            dist[idx, k] = list(t.values())
        return position_policy(dist)(data)

    return target, named


def load_target(spec: str) -> tuple[TargetPolicy, list[int]]:
    if spec == "uniform":
        return uniform_policy, []
    if spec.endswith(".json"):
        return json_policy(Path(spec))
    if ":" in spec:
        module, _, name = spec.partition(":")
        fn = getattr(importlib.import_module(module), name)
        if not callable(fn):
            raise ValueError(f"--target {spec}: {name} is not callable")
        return fn, []
    raise ValueError(f"--target {spec!r}: expected 'uniform', a .json file or module:function")


def _default_db() -> str:
    if os.environ.get("GMCO_RL_STATE_BACKEND", "sqlite") == "postgres":
        dsn = os.environ.get("GMCO_RL_STATE_POSTGRES_DSN")
        if not dsn:
            raise SystemExit("GMCO_RL_STATE_BACKEND=postgres but GMCO_RL_STATE_POSTGRES_DSN is not set; use --db")
        return dsn
    return os.environ.get("GMCO_RL_STATE_SQLITE_PATH", ".run/rl_state.sqlite3")


def _table(report: OPEReport, dropped: int) -> str:
    pct = round(report.confidence * 100)
    lines = [f"{'estimator':<12} {'value':>10} {f'{pct}% low':>10} {f'{pct}% high':>10} {'se':>10}"]
    for name, e in [*report.estimates.items(), ("logged", report.logging_value)]:
        lines.append(f"{name:<12} {e.value:>10.5f} {e.ci_low:>10.5f} {e.ci_high:>10.5f} {e.se:>10.5f}")
    d = report.diagnostics
    lines.append(f"rows {d.n} (dropped {dropped} with unknown propensity), ESS {d.ess:.1f} "
                 f"({d.ess_fraction:.1%}), weight max {d.max_weight:.3g} mean {d.mean_weight:.3g}, "
                 f"clipped {d.clipped_share:.2%}, target mass on never-logged actions "
                 f"{d.unsupported_target_mass:.2%}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m gmco_rl_state.ope",
        description="Off-policy evaluation of a target ranking policy from the rl_state feedback log: IPS, "
                    "clipped IPS, SNIPS, DM and DR with bootstrap intervals, and weight diagnostics.",
        epilog="The target is 'uniform' (every logged item equally likely), a JSON file "
               '({"distribution": {"<media_id>": p}} or {"by_position": [{...}, ...]}), or module:function, '
               "a Python callable (LoggedData) -> (n, n_actions) array; see the module docstring.")
    parser.add_argument("--db", help="SQLite file or PostgreSQL DSN/URI (default: GMCO_RL_STATE_BACKEND with "
                                     "GMCO_RL_STATE_SQLITE_PATH or GMCO_RL_STATE_POSTGRES_DSN)")
    parser.add_argument("--target", required=True, help="uniform | FILE.json | module:function")
    parser.add_argument("--weighting", choices=(INDEPENDENT, CASCADE), default=INDEPENDENT)
    parser.add_argument("--reward-model", choices=("mean", "ridge"), default="mean")
    parser.add_argument("--clip", type=float, default=100.0, help="weight cap of clipped IPS")
    parser.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples")
    parser.add_argument("--confidence", type=float, default=0.95)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--since-ms", type=int, help="events at or after this Unix time (ms)")
    parser.add_argument("--until-ms", type=int, help="events before this Unix time (ms)")
    parser.add_argument("--surface", type=int, help="only this Surface enum value")
    parser.add_argument("--policy", help="only events logged under this policy (needs a policy column)")
    parser.add_argument("--limit", type=int, help="at most this many events (oldest first)")
    parser.add_argument("--max-cells", type=float, default=5e7,
                        help="refuse when rows x actions exceeds this (the target's array is dense)")
    parser.add_argument("--format", choices=("json", "table"), default="json")
    args = parser.parse_args(argv)
    try:
        target, named = load_target(args.target)
        log = read_feedback(args.db or _default_db(), since_ms=args.since_ms, until_ms=args.until_ms,
                            surface=args.surface, policy=args.policy, limit=args.limit)
        if len(log) == 0:
            raise ValueError("no feedback events in the selection")
        data, dropped = logged_data(log, named)
        if data.n * data.n_actions > args.max_cells:
            raise ValueError(f"{data.n} rows x {data.n_actions} actions exceeds --max-cells {args.max_cells:g}: "
                             "narrow the selection (--since-ms, --surface, --limit)")
        model = MeanRewardModel() if args.reward_model == "mean" else RidgeRewardModel()
        report = evaluate(data, target, weighting=args.weighting, clip=args.clip, reward_model=model,
                          n_bootstrap=args.bootstrap, confidence=args.confidence, seed=args.seed)
    except (ValueError, FileNotFoundError, ImportError, AttributeError) as exc:
        print(f"gmco_rl_state.ope: {exc}", file=sys.stderr)
        return 2
    if args.format == "table":
        print(_table(report, dropped))
    else:
        print(json.dumps({**report.to_dict(), "dropped_unknown_propensity": dropped}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
