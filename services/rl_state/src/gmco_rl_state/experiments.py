"""Policy experiments: users assigned to ranking policies by a stable hash, per-policy counters, and a guard
that rolls a canary back when it is worse than the control. Pure logic; no I/O besides :func:`load_config`.

Assignment
----------
A user's bucket is ``u = blake2b-64(salt + "\\0" + user_id) / 2^64`` in [0, 1): the same in every process,
on every machine and after restarts (no ``hash()``, whose seed changes per process). The arms' weights,
normalised to sum to 1, cut [0, 1) into consecutive ranges: the canary's first, then the control's, then
the other arms' in the order listed. So ramping a canary up at the control's expense (5% -> 10%) moves
only control users to it, and rolling it back (:meth:`ExperimentConfig.rolled_back`: its weight to the
control) moves only its users, to the control; everyone else keeps their policy. A new ``salt``
reshuffles everyone: use one per experiment.

Configuration (JSON, or YAML when PyYAML is installed)::

    {"salt": "ranker-2024-06", "control": "thompson", "canary": "thompson-v2",
     "arms": {"thompson": 95, "thompson-v2": 5},
     "guard": {"margin": 0.0, "confidence": 0.95, "min_impressions": 500, "mixture_scale": 0.01}}

``arms`` maps policy name to a relative weight (or is a list of ``{"name", "weight"}``). ``canary`` is
optional (without it: a plain A/B test, no guard). An arm is a built-in policy (``thompson``, ``greedy``)
or one defined under ``policies``: a built-in with some of its settings changed, e.g.
``"policies": {"thompson-v2": {"policy": "thompson", "prior_scale": 0.1, "diversity_lambda": 0.7}}``
(the keys: ``policy``, ``prior_scale``, ``preference_weight``, ``diversity_lambda``; the others come from the
service's settings). The running service (``gmco_rl_state.rollout``) watches the file and applies changes
without a restart.

The guard
---------
H0: the canary's mean reward is at least the control's minus ``margin`` (``mu_c - mu_0 >= -margin``).
The guard rolls back when H0 is rejected by a *mixture sequential probability ratio test* (mSPRT; Robbins
1970, Johari et al. 2017, "Peeking at A/B tests"), which stays valid however often it is checked: the
probability that it *ever* rolls back a canary satisfying H0 is at most ``1 - confidence``.

With ``D = mean_c - mean_0``, ``s^2`` the pooled variance of a reward, ``I = 1 / (s^2 (1/n_c + 1/n_0))``
(the information about the difference) and ``delta = D + margin``, the statistic is the likelihood ratio
of "difference ~ N(-margin, tau^2)" against "difference = -margin", integrated over the normal mixture::

    log L = -1/2 log(1 + I tau^2) + I^2 tau^2 delta^2 / (2 (1 + I tau^2))

and the guard fires when ``delta < 0`` and ``log L >= log(1 / (1 - confidence))``. (Firing only on the
low side makes the two-sided bound conservative: the false-rollback rate is at most ``1 - confidence``,
nearer half of it at the boundary.) ``tau`` (``mixture_scale``, in reward units) sets where the test is
most powerful: near the differences it should catch. The normal approximation (CLT, plug-in variance) is
why nothing is decided before ``min_impressions`` in each arm.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
from gmco_common.errors import InvalidArgument


def bucket(user_id: str, salt: str = "") -> float:
    """The user's stable position in [0, 1)."""
    digest = hashlib.blake2b(f"{salt}\0{user_id}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2.0**64


@dataclass(frozen=True)
class Arm:
    name: str
    weight: float  # relative; the config normalises


@dataclass(frozen=True)
class GuardConfig:
    margin: float = 0.0  # tolerated shortfall of the canary's mean reward, in reward units
    confidence: float = 0.95  # 1 - the bound on the false-rollback probability
    min_impressions: int = 500  # per arm, before the guard decides anything
    mixture_scale: float = 0.01  # tau: the differences (reward units) the test is tuned for


BUILTIN_POLICIES = ("thompson", "greedy")
# what a ``policies`` entry may change, with its check
POLICY_OVERRIDES: dict[str, tuple[Any, str]] = {
    "prior_scale": (lambda v: v > 0, "> 0"),
    "preference_weight": (lambda v: v >= 0, ">= 0"),
    "diversity_lambda": (lambda v: 0 < v <= 1, "in (0, 1]"),
}


@dataclass(frozen=True)
class PolicySpec:
    """A named ranking policy: a built-in (``base``) with some settings changed."""

    name: str
    base: str
    overrides: tuple[tuple[str, float], ...] = ()


@dataclass(frozen=True)
class ExperimentConfig:
    arms: tuple[Arm, ...]
    control: str
    canary: str | None = None
    salt: str = ""
    guard: GuardConfig = field(default_factory=GuardConfig)
    policies: tuple[PolicySpec, ...] = ()

    def policy(self, name: str) -> PolicySpec:
        """What ``name`` means: its ``policies`` entry, or the built-in of that name."""
        for spec in self.policies:
            if spec.name == name:
                return spec
        if name in BUILTIN_POLICIES:
            return PolicySpec(name, name)
        raise InvalidArgument(f"arms.{name}", f"is neither a built-in policy {list(BUILTIN_POLICIES)} nor defined "
                                              "under 'policies'")

    def __post_init__(self) -> None:
        names = [a.name for a in self.arms]
        if not names:
            raise InvalidArgument("arms", "at least one policy is required")
        if len(set(names)) != len(names):
            raise InvalidArgument("arms", f"policy names repeat: {names}")
        for a in self.arms:
            if not a.name:
                raise InvalidArgument("arms", "a policy name is empty")
            if not (math.isfinite(a.weight) and a.weight >= 0):
                raise InvalidArgument(f"arms.{a.name}", f"weight is {a.weight}; must be a finite number >= 0")
        if sum(a.weight for a in self.arms) <= 0:
            raise InvalidArgument("arms", "the weights sum to 0")
        if self.control not in names:
            raise InvalidArgument("control", f"{self.control!r} is not one of the arms {names}")
        if self.canary is not None:
            if self.canary not in names:
                raise InvalidArgument("canary", f"{self.canary!r} is not one of the arms {names}")
            if self.canary == self.control:
                raise InvalidArgument("canary", "must differ from control")
        g = self.guard
        if not (math.isfinite(g.margin) and g.margin >= 0):
            raise InvalidArgument("guard.margin", f"is {g.margin}; must be >= 0")
        if not 0.5 <= g.confidence < 1:
            raise InvalidArgument("guard.confidence", f"is {g.confidence}; must be in [0.5, 1)")
        if g.min_impressions < 2:
            raise InvalidArgument("guard.min_impressions", f"is {g.min_impressions}; must be >= 2")
        if not (math.isfinite(g.mixture_scale) and g.mixture_scale > 0):
            raise InvalidArgument("guard.mixture_scale", f"is {g.mixture_scale}; must be > 0")

    # --- assignment -------------------------------------------------------------------------------------
    def _layout(self) -> list[tuple[str, float]]:
        """(arm, upper end of its range): canary, control, then the rest in their order."""
        ordered = sorted(self.arms, key=lambda a: (a.name != self.canary, a.name != self.control))  # stable
        total = sum(a.weight for a in ordered)
        edges, acc = [], 0.0
        for a in ordered:
            acc += a.weight / total
            edges.append((a.name, acc))
        return edges

    def assign(self, user_id: str) -> str:
        """The policy of ``user_id``: the same in every process for the same configuration."""
        u = bucket(user_id, self.salt)
        layout = self._layout()
        for name, upper in layout:
            if u < upper:
                return name
        return next(name for name, _ in reversed(layout) if self.weight(name) > 0)  # rounding at u ~ 1

    def weight(self, name: str) -> float:
        """The share of users on ``name``, in [0, 1]."""
        total = sum(a.weight for a in self.arms)
        return next(a.weight for a in self.arms if a.name == name) / total

    def rolled_back(self) -> ExperimentConfig:
        """The configuration with the canary's weight given to the control (``canary`` kept, weight 0)."""
        if self.canary is None:
            return self
        moved = next(a.weight for a in self.arms if a.name == self.canary)
        arms = tuple(Arm(a.name, 0.0 if a.name == self.canary else a.weight + (moved if a.name == self.control
                                                                                 else 0.0))
                     for a in self.arms)
        return replace(self, arms=arms)

    def to_dict(self) -> dict[str, Any]:
        return {"salt": self.salt, "control": self.control, "canary": self.canary,
                "arms": {a.name: a.weight for a in self.arms}, "guard": asdict(self.guard),
                "policies": {p.name: {"policy": p.base, **dict(p.overrides)} for p in self.policies}}

    def digest(self) -> str:
        """A short id of this configuration, to log beside each impression it assigned."""
        canonical = json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))
        return hashlib.blake2b(canonical.encode(), digest_size=6).hexdigest()


def parse_config(doc: Mapping[str, Any]) -> ExperimentConfig:
    """An :class:`ExperimentConfig` from a parsed JSON/YAML document; INVALID_ARGUMENT names a bad field."""
    if not isinstance(doc, Mapping):
        raise InvalidArgument("config", "must be an object")
    unknown = set(doc) - {"salt", "control", "canary", "arms", "guard", "policies"}
    if unknown:
        raise InvalidArgument(min(unknown), "unknown key")
    raw_arms = doc.get("arms")
    if isinstance(raw_arms, Mapping):
        pairs = list(raw_arms.items())
    elif isinstance(raw_arms, list):
        try:
            pairs = [(a["name"], a["weight"]) for a in raw_arms]
        except (TypeError, KeyError) as exc:
            raise InvalidArgument("arms", "a list of arms needs a 'name' and a 'weight' in each") from exc
    else:
        raise InvalidArgument("arms", "must map policy names to weights")
    arms = []
    for name, weight in pairs:
        if not isinstance(name, str) or isinstance(weight, bool) or not isinstance(weight, int | float):
            raise InvalidArgument(f"arms.{name}", "needs a string name and a numeric weight")
        arms.append(Arm(name, float(weight)))
    control = doc.get("control")
    if not isinstance(control, str):
        raise InvalidArgument("control", "is required: the name of the control policy")
    canary = doc.get("canary")
    if canary is not None and not isinstance(canary, str):
        raise InvalidArgument("canary", "must be a policy name")
    salt = doc.get("salt", "")
    if not isinstance(salt, str):
        raise InvalidArgument("salt", "must be a string")
    raw_guard = doc.get("guard", {})
    if not isinstance(raw_guard, Mapping):
        raise InvalidArgument("guard", "must be an object")
    defaults = GuardConfig()
    values: dict[str, Any] = {}
    for key, default in asdict(defaults).items():
        value = raw_guard.get(key, default)
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise InvalidArgument(f"guard.{key}", f"must be a number, not {value!r}")
        values[key] = int(value) if isinstance(default, int) else float(value)
    if set(raw_guard) - set(values):
        raise InvalidArgument(f"guard.{min(set(raw_guard) - set(values))}", "unknown key")
    return ExperimentConfig(tuple(arms), control, canary, salt, GuardConfig(**values),
                            _parse_policies(doc.get("policies", {})))


def _parse_policies(raw: Any) -> tuple[PolicySpec, ...]:
    if not isinstance(raw, Mapping):
        raise InvalidArgument("policies", "must map policy names to {policy, settings...}")
    specs = []
    for name, body in raw.items():
        field_ = f"policies.{name}"
        if not isinstance(name, str) or not name or name in BUILTIN_POLICIES:
            raise InvalidArgument(field_, f"needs a name other than the built-ins {list(BUILTIN_POLICIES)}")
        if not isinstance(body, Mapping):
            raise InvalidArgument(field_, "must be an object")
        base = body.get("policy")
        if base not in BUILTIN_POLICIES:
            raise InvalidArgument(f"{field_}.policy", f"is {base!r}; must be one of {list(BUILTIN_POLICIES)}")
        overrides = []
        for key, value in body.items():
            if key == "policy":
                continue
            if key not in POLICY_OVERRIDES:
                raise InvalidArgument(f"{field_}.{key}", f"unknown key (known: policy, {', '.join(POLICY_OVERRIDES)})")
            check, msg = POLICY_OVERRIDES[key]
            if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) \
                    or not check(value):
                raise InvalidArgument(f"{field_}.{key}", f"is {value!r}; must be a number {msg}")
            overrides.append((key, float(value)))
        specs.append(PolicySpec(name, base, tuple(sorted(overrides))))
    return tuple(specs)


def load_config(path: Path) -> ExperimentConfig:
    """Read a JSON file, or YAML (``.yaml``/``.yml``, needs PyYAML)."""
    text = path.read_text()
    if path.suffix in (".yaml", ".yml"):
        import yaml  # only where YAML configs are used

        doc = yaml.safe_load(text)
    else:
        try:
            doc = json.loads(text)
        except json.JSONDecodeError as exc:
            raise InvalidArgument(str(path), f"is not valid JSON: {exc}") from exc
    return parse_config(doc)


# --- counters -------------------------------------------------------------------------------------------
@dataclass
class PolicyCounters:
    """What one policy has shown and earned. Rewards are summed with their squares, for the guard's variance."""

    impressions: int = 0
    reward_sum: float = 0.0
    reward_sq_sum: float = 0.0
    propensity_sum: float = 0.0

    def record(self, reward: float, propensity: float) -> None:
        self.impressions += 1
        self.reward_sum += reward
        self.reward_sq_sum += reward * reward
        self.propensity_sum += propensity

    def show(self, propensities: Any) -> None:
        """Impressions served (their rewards, if any, come later through :meth:`reward`; an impression that
        never gets feedback counts as reward 0)."""
        p = np.asarray(propensities, dtype=np.float64)
        self.impressions += int(p.size)
        self.propensity_sum += float(p.sum())

    def reward(self, rewards: Any) -> None:
        r = np.asarray(rewards, dtype=np.float64)
        self.reward_sum += float(r.sum())
        self.reward_sq_sum += float((r * r).sum())

    def merge(self, other: PolicyCounters) -> None:
        self.impressions += other.impressions
        self.reward_sum += other.reward_sum
        self.reward_sq_sum += other.reward_sq_sum
        self.propensity_sum += other.propensity_sum

    @property
    def reward_rate(self) -> float:
        return self.reward_sum / self.impressions if self.impressions else 0.0

    @property
    def mean_propensity(self) -> float:
        return self.propensity_sum / self.impressions if self.impressions else 0.0


@dataclass
class ExperimentCounters:
    by_policy: dict[str, PolicyCounters] = field(default_factory=dict)

    def record(self, policy: str, reward: float, propensity: float) -> None:
        self.by_policy.setdefault(policy, PolicyCounters()).record(reward, propensity)

    def get(self, policy: str) -> PolicyCounters:
        return self.by_policy.get(policy, PolicyCounters())


# --- the guard ------------------------------------------------------------------------------------------
def msprt_log_lr(n_c: np.ndarray | float, sum_c: np.ndarray | float, sq_c: np.ndarray | float,
                 n_0: np.ndarray | float, sum_0: np.ndarray | float, sq_0: np.ndarray | float,
                 margin: float, tau: float) -> tuple[np.ndarray, np.ndarray]:
    """``(log L, delta)`` of the guard's mSPRT (module docstring), elementwise over arrays of counters."""
    n_c, n_0 = np.asarray(n_c, dtype=np.float64), np.asarray(n_0, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        mean_c, mean_0 = np.asarray(sum_c) / n_c, np.asarray(sum_0) / n_0
        n = n_c + n_0
        pooled_mean = (np.asarray(sum_c) + np.asarray(sum_0)) / n
        var = np.maximum((np.asarray(sq_c) + np.asarray(sq_0)) / n - pooled_mean**2, 1e-12)
        info = 1.0 / (var * (1.0 / n_c + 1.0 / n_0))
        delta = mean_c - mean_0 + margin
        t2 = tau * tau
        log_lr = -0.5 * np.log1p(info * t2) + info * info * t2 * delta * delta / (2.0 * (1.0 + info * t2))
    return log_lr, delta


@dataclass(frozen=True)
class GuardDecision:
    rollback: bool
    reason: str
    canary_rate: float
    control_rate: float
    log_likelihood_ratio: float
    threshold: float  # log(1 / (1 - confidence))
    canary_impressions: int
    control_impressions: int


def check_canary(config: ExperimentConfig, counters: ExperimentCounters) -> GuardDecision | None:
    """Whether to roll the canary back now; None when the configuration has no canary."""
    if config.canary is None:
        return None
    g = config.guard
    c, ctl = counters.get(config.canary), counters.get(config.control)
    threshold = math.log(1.0 / (1.0 - g.confidence))

    def decision(rollback: bool, reason: str, log_lr: float = 0.0) -> GuardDecision:
        return GuardDecision(rollback, reason, c.reward_rate, ctl.reward_rate, log_lr, threshold, c.impressions,
                             ctl.impressions)

    if min(c.impressions, ctl.impressions) < g.min_impressions:
        return decision(False, f"waiting: {c.impressions} canary and {ctl.impressions} control impressions, "
                               f"{g.min_impressions} each needed")
    log_lr, delta = msprt_log_lr(c.impressions, c.reward_sum, c.reward_sq_sum, ctl.impressions, ctl.reward_sum,
                                 ctl.reward_sq_sum, g.margin, g.mixture_scale)
    log_lr, delta = float(log_lr), float(delta)
    rates = (f"canary {config.canary!r} reward rate {c.reward_rate:.5f} over {c.impressions} impressions vs "
             f"control {config.control!r} {ctl.reward_rate:.5f} over {ctl.impressions}")
    if delta < 0 and log_lr >= threshold:
        return decision(True, f"rolling back: {rates}, below it by more than the margin {g.margin:g} at "
                              f"confidence {g.confidence:g} (mSPRT log LR {log_lr:.2f} >= {threshold:.2f})", log_lr)
    return decision(False, f"keeping: {rates} (mSPRT log LR {log_lr:.2f}, rolls back at {threshold:.2f} "
                           "when the canary is lower)", log_lr)
