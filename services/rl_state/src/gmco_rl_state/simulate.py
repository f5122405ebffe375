"""Simulations with known answers, for checking :mod:`gmco_rl_state.ope` and the guard of
:mod:`gmco_rl_state.experiments` (used by the tests and by ``bench/bench_quality.py``).

Slates. ``C`` user contexts (drawn with fixed probabilities), ``A`` items and ``K <= 3`` positions. Both the
logging and the target policy are Plackett-Luce rankers (sequential softmax without replacement, sampled
with Gumbel-top-k) over their own logits per context; their exact position marginals are computed by
enumeration. Clicks follow a position-based model: ``P(click | x, a, k) = bias[k] * q[x, a]``. The true
value per impression of the target is then ``sum_x P(x) (1/K) sum_k bias[k] sum_a P_target(a at k | x) q[x, a]``.

Canary. Each impression goes to the canary with probability ``share``; rewards are Bernoulli at each arm's
rate; the guard is checked every ``check_every`` impressions, as a service would on a timer.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from gmco_rl_state.experiments import GuardConfig, msprt_log_lr
from gmco_rl_state.ope import CASCADE, ESTIMATORS, INDEPENDENT, LoggedData, TargetPolicy, evaluate


# --- slates ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SlateWorld:
    context_prob: np.ndarray  # (C,)
    click: np.ndarray  # (C, A) q[x, a]
    position_bias: np.ndarray  # (K,)
    logging_logits: np.ndarray  # (C, A)
    target_logits: np.ndarray  # (C, A)

    @property
    def n_actions(self) -> int:
        return self.click.shape[1]

    @property
    def n_positions(self) -> int:
        return len(self.position_bias)


def make_slate_world(n_contexts: int = 8, n_actions: int = 20, n_positions: int = 3, seed: int = 0,
                     logging_sharpness: float = 0.4, target_sharpness: float = 1.2) -> SlateWorld:
    """A world where the target ranks by the true affinity more sharply than the (noisier) logger."""
    rng = np.random.default_rng(seed)
    affinity = rng.standard_normal((n_contexts, 4)) @ rng.standard_normal((4, n_actions)) / 2.0
    click = 1.0 / (1.0 + np.exp(-(affinity - 2.0)))
    logging = logging_sharpness * (affinity + 0.7 * rng.standard_normal(affinity.shape))
    return SlateWorld(context_prob=rng.dirichlet(np.full(n_contexts, 3.0)), click=click,
                      position_bias=np.array([1.0, 0.7, 0.5][:n_positions]), logging_logits=logging,
                      target_logits=target_sharpness * affinity)


def _softmax(logits: np.ndarray) -> np.ndarray:
    e = np.exp(logits - logits.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def pl_marginals(logits: np.ndarray, n_positions: int) -> np.ndarray:
    """(C, A, K): the exact probability that a Plackett-Luce ranker over ``logits`` (C, A) puts each item at
    each of the first ``n_positions`` (<= 3) positions."""
    if not 1 <= n_positions <= 3:
        raise ValueError("exact marginals are implemented for 1..3 positions")
    p = _softmax(logits)
    c, a = p.shape
    out = np.zeros((c, a, n_positions))
    out[:, :, 0] = p
    eye = np.eye(a, dtype=bool)
    if n_positions >= 2:
        # first[b] * p[a] / (1 - p[b]), b != a
        pair = p[:, :, None] * p[:, None, :] / (1.0 - p[:, :, None])  # [x, b, a]
        pair[:, eye] = 0.0
        out[:, :, 1] = pair.sum(axis=1)
    if n_positions == 3:
        rest = 1.0 - p[:, :, None] - p[:, None, :]  # [x, b, c]
        with np.errstate(divide="ignore", invalid="ignore"):
            third = pair[:, :, :, None] * p[:, None, None, :] / rest[:, :, :, None]  # [x, b, c, a]
        distinct = ~(eye[:, :, None] | eye[:, None, :] | eye[None, :, :])
        third = np.where(distinct[None], third, 0.0)
        out[:, :, 2] = third.sum(axis=(1, 2))
    return out


def true_value(world: SlateWorld) -> float:
    """The target's exact expected reward per impression."""
    m = pl_marginals(world.target_logits, world.n_positions)
    per_context = np.einsum("xak,xa,k->x", m, world.click, world.position_bias) / world.n_positions
    return float(per_context @ world.context_prob)


def _conditional(p: np.ndarray, contexts: np.ndarray, slates: np.ndarray) -> np.ndarray:
    """(n_slates, K): each shown item's Plackett-Luce probability given the items above it."""
    probs = p[contexts[:, None], slates]
    taken = np.concatenate([np.zeros((len(slates), 1)), np.cumsum(probs, axis=1)[:, :-1]], axis=1)
    return probs / (1.0 - taken)


def simulate_slates(world: SlateWorld, n_slates: int, rng: np.random.Generator,
                    weighting: str = INDEPENDENT) -> tuple[LoggedData, TargetPolicy]:
    """A log of ``n_slates`` lists from the logging policy, with the propensities ``weighting`` needs
    (marginal for independent, conditional for cascade), and the target policy in the same form."""
    k = world.n_positions
    contexts = rng.choice(len(world.context_prob), n_slates, p=world.context_prob)
    noisy = world.logging_logits[contexts] + rng.gumbel(size=(n_slates, world.n_actions))
    slates = np.argsort(-noisy, axis=1)[:, :k]  # Gumbel-top-k = Plackett-Luce
    clicks = rng.random((n_slates, k)) < world.position_bias[None, :] * world.click[contexts[:, None], slates]
    if weighting == INDEPENDENT:
        marg = pl_marginals(world.logging_logits, k)
        props = marg[contexts[:, None], slates, np.arange(k)[None, :]]
    elif weighting == CASCADE:
        props = _conditional(_softmax(world.logging_logits), contexts, slates)
    else:
        raise ValueError(f"unknown weighting {weighting!r}")
    context_rows = np.repeat(contexts, k)
    data = LoggedData(action=slates.ravel(), reward=clicks.ravel().astype(np.float64), propensity=props.ravel(),
                      n_actions=world.n_actions, position=np.tile(np.arange(k), n_slates),
                      context=np.eye(len(world.context_prob))[context_rows], slate=np.repeat(np.arange(n_slates), k),
                      meta={"context": context_rows})
    return data, slate_target(world, weighting)


def slate_target(world: SlateWorld, weighting: str = INDEPENDENT) -> TargetPolicy:
    """The world's target policy as a :data:`TargetPolicy`: position marginals (independent), or the
    probability given the logged items above the row (cascade)."""
    p = _softmax(world.target_logits)
    marg = pl_marginals(world.target_logits, world.n_positions)

    def target(data: LoggedData) -> np.ndarray:
        x = data.meta["context"]
        if weighting == INDEPENDENT:
            return marg[x, :, data.position]
        # cascade: zero the items above the row in its slate, renormalise what is left
        # (rows sorted by slate and position: the row j places above a row at position >= j is j rows back)
        pi = p[x].copy()
        order = np.lexsort((data.position, data.slate))
        sorted_pos = data.position[order]
        for j in range(1, data.n_positions):
            idx = np.flatnonzero(sorted_pos >= j)
            pi[order[idx], data.action[order[idx - j]]] = 0.0
        return pi / pi.sum(axis=1, keepdims=True)

    return target


def coverage_study(world: SlateWorld, n_slates: int, runs: int, n_bootstrap: int = 200, seed: int = 0,
                   weighting: str = INDEPENDENT, confidence: float = 0.95) -> dict:
    """Repeat simulate-then-estimate ``runs`` times: each estimator's bias, RMSE, CI coverage of the true value
    and mean CI width."""
    truth = true_value(world)
    rng = np.random.default_rng(seed)
    values = {name: np.empty(runs) for name in ESTIMATORS}
    covered = {name: np.zeros(runs, dtype=bool) for name in ESTIMATORS}
    widths = {name: np.empty(runs) for name in ESTIMATORS}
    ess = np.empty(runs)
    for r in range(runs):
        data, target = simulate_slates(world, n_slates, rng, weighting)
        report = evaluate(data, target, weighting=weighting, n_bootstrap=n_bootstrap, confidence=confidence,
                          seed=seed + r)
        ess[r] = report.diagnostics.ess_fraction
        for name, e in report.estimates.items():
            values[name][r] = e.value
            covered[name][r] = e.ci_low <= truth <= e.ci_high
            widths[name][r] = e.ci_high - e.ci_low
    return {
        "true_value": truth, "runs": runs, "n_slates": n_slates, "n_positions": world.n_positions,
        "weighting": weighting, "confidence": confidence, "n_bootstrap": n_bootstrap,
        "mean_ess_fraction": float(ess.mean()),
        "estimators": {name: {"bias": float(values[name].mean() - truth),
                              "rmse": float(np.sqrt(np.mean((values[name] - truth) ** 2))),
                              "coverage": float(covered[name].mean()),
                              "mean_ci_width": float(widths[name].mean())} for name in ESTIMATORS},
    }


# --- the canary guard -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class GuardRuns:
    rolled_back: np.ndarray  # (runs,) bool: rolled back within max_impressions
    impressions: np.ndarray  # (runs,) total impressions when rolled back (nan when not)
    canary_impressions: np.ndarray  # (runs,) canary impressions when rolled back (nan when not)
    final: dict[str, np.ndarray]  # per run, at rollback or the end: n_canary, clicks_canary, n_control, clicks_control

    @property
    def rollback_rate(self) -> float:
        return float(self.rolled_back.mean())


def simulate_guard(guard: GuardConfig, control_rate: float, canary_rate: float, canary_share: float, *,
                   max_impressions: int = 1_000_000, check_every: int = 1000, runs: int = 500,
                   seed: int = 0) -> GuardRuns:
    """Bernoulli rewards at each arm's rate; the guard checked every ``check_every`` impressions, until it
    rolls back or ``max_impressions`` have been shown. All runs advance together (vectorised)."""
    rng = np.random.default_rng(seed)
    n_c = np.zeros(runs)
    n_0 = np.zeros(runs)
    s_c = np.zeros(runs)
    s_0 = np.zeros(runs)
    done = np.zeros(runs, dtype=bool)
    at = np.full(runs, np.nan)
    at_canary = np.full(runs, np.nan)
    threshold = np.log(1.0 / (1.0 - guard.confidence))
    for step in range(1, max_impressions // check_every + 1):
        to_canary = rng.binomial(check_every, canary_share, runs)
        live = ~done
        n_c += np.where(live, to_canary, 0)
        n_0 += np.where(live, check_every - to_canary, 0)
        s_c += np.where(live, rng.binomial(to_canary, canary_rate), 0)
        s_0 += np.where(live, rng.binomial(check_every - to_canary, control_rate), 0)
        ready = live & (np.minimum(n_c, n_0) >= guard.min_impressions)
        if not ready.any():
            continue
        log_lr, delta = msprt_log_lr(n_c, s_c, s_c, n_0, s_0, s_0, guard.margin, guard.mixture_scale)
        fire = ready & (delta < 0) & (log_lr >= threshold)
        at[fire] = step * check_every
        at_canary[fire] = n_c[fire]
        done |= fire
        if done.all():
            break
    return GuardRuns(done, at, at_canary, {"n_canary": n_c, "clicks_canary": s_c, "n_control": n_0,
                                           "clicks_control": s_0})
