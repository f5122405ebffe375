"""Ranking policies: linear Thompson sampling (or greedy) for known users, popularity + context for cold start.

Every policy returns, per chosen item, the probability with which it was chosen at its position given
the items above it (the propensity, for offline inverse-propensity evaluation) and whether the pick
departed from what the greedy choice would have been at that position (the exploration flag).

Diversity (``diversity_lambda``, ``GMCO_RL_STATE_DIVERSITY_LAMBDA``)
------------------------------------------------------------------
Maximal marginal relevance (Carbonell and Goldstein, 1998) over the candidates' own features: position ``i``
goes to the remaining item with the largest ``lambda * rel(j) - (1 - lambda) * max_{s above} cos(j, s)``,
where ``rel`` is the policy's score min-max scaled to [0, 1] over the candidates and ``cos`` the cosine of
the candidates' bandit features (or of their vectors when Rank was given vectors). ``lambda = 1`` is no
re-ranking (the default); lower values trade relevance for a less redundant list (see docs/benchmarks.md,
"Recommendation quality", for the measured trade-off).

The re-ranking is part of the policy, not a stage after it, so the logged propensities stay what they
claim to be (the probability of the item at that position given the items above it, under the policy that
was applied):

- Thompson: the sampled scores (posterior draw 0) go through MMR; the propensity of the pick at position
  ``i`` is the share of the independent posterior draws 1..S whose MMR pick at ``i``, given the same items
  above (the penalty term depends only on them), is that item, conditioned as without MMR (below).
- Cold start: MMR inside the sequential softmax: at each position the logits are the MMR scores of the
  remaining items over the temperature, so the propensity is that softmax probability, exactly.
- Greedy: MMR on the posterior mean; deterministic, propensity 1.

The exploration flag compares each pick with what the same MMR would pick from the posterior mean (or the
cold-start utility) given the items above.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from gmco.common.v1 import common_pb2

from gmco_rl_state.model import Learner, UserState

THOMPSON = "thompson"
GREEDY = "greedy"
COLD_START = "cold_start"

# Cold start: weight of popularity against retrieval relevance, by surface. The homepage has no
# other context, so popularity leads; a video page's candidates were retrieved around the item being
# watched, and search results around the query, so relevance leads there.
POPULARITY_WEIGHT = {
    common_pb2.SURFACE_UNSPECIFIED: 0.5,
    common_pb2.SURFACE_HOMEPAGE: 0.8,
    common_pb2.SURFACE_VIDEO_PAGE: 0.3,
    common_pb2.SURFACE_SEARCH_RESULTS: 0.1,
}


@dataclass(frozen=True)
class PolicyConfig:
    policy: str
    prior_scale: float
    preference_weight: float
    propensity_samples: int
    cold_start_temperature: float
    diversity_lambda: float = 1.0  # MMR relevance weight in (0, 1]; 1 = no diversity re-ranking
    name: str = ""  # the name Rank reports for users with state (an experiment's arm); "" = ``policy``

    @property
    def mmr(self) -> bool:
        return self.diversity_lambda < 1.0


@dataclass(frozen=True)
class Ranking:
    """Positions into the candidate arrays, best first, with score, exploration flag and propensity."""

    indices: np.ndarray
    scores: np.ndarray
    exploration: np.ndarray
    propensities: np.ndarray
    policy: str


def _minmax(values: np.ndarray) -> np.ndarray:
    span = float(values.max() - values.min())
    return (values - values.min()) / span if span > 0 else np.zeros_like(values)


def _greedy_pick_flags(order: np.ndarray, utility: np.ndarray) -> np.ndarray:
    """For each position, whether the pick differs from the best remaining item by ``utility``."""
    by_utility = np.argsort(-utility, kind="stable")
    taken = np.zeros(len(utility), dtype=bool)
    pointer = 0
    flags = np.zeros(len(order), dtype=bool)
    for pos, pick in enumerate(order):
        while taken[by_utility[pointer]]:
            pointer += 1
        flags[pos] = by_utility[pointer] != pick and utility[by_utility[pointer]] > utility[pick]
        taken[pick] = True
    return flags


class Ranker:
    def __init__(self, learner: Learner, config: PolicyConfig) -> None:
        self._learner = learner
        self.config = config

    def rank_user(self, state: UserState, vectors: np.ndarray, k: int, rng: np.random.Generator) -> Ranking:
        """Top ``k`` of ``vectors`` (n x media_dim, unit rows) for a user with state: projects them, and
        takes the preference term as their similarity to the user's preference vector."""
        preference = None
        if state.pref is not None:
            preference = (vectors @ state.pref).astype(np.float64)
        return self.rank_features(state, self._learner.project(vectors), preference, k, rng, similar=vectors)

    def rank_features(self, state: UserState, z: np.ndarray, preference: np.ndarray | None, k: int,
                      rng: np.random.Generator, similar: np.ndarray | None = None) -> Ranking:
        """Top ``k`` of candidates given as bandit features ``z`` (n x d) and their similarity to the user's
        vector (``preference``; None when the user has none yet). ``similar`` (n x any): what diversity
        compares candidates by (default ``z``)."""
        cfg = self.config
        z = np.asarray(z, dtype=np.float64)
        base = np.zeros(len(z))
        if preference is not None and state.pref is not None and cfg.preference_weight > 0:
            base = cfg.preference_weight * np.asarray(preference, dtype=np.float64)
        chol = np.linalg.cholesky(state.a)
        theta_hat = np.linalg.solve(chol.T, np.linalg.solve(chol, state.b))
        mean = z @ theta_hat + base
        name = cfg.name or cfg.policy
        # MMR needs two candidates to choose between (and none at all: every candidate was seen)
        sim = _cosine(similar if similar is not None else z) if cfg.mmr and len(z) > 1 and k > 1 else None
        if cfg.policy == GREEDY:
            order = (np.argsort(-mean, kind="stable")[:k] if sim is None
                     else mmr_order(_minmax(mean), sim, cfg.diversity_lambda, k))
            ones = np.ones(len(order), dtype=np.float32)
            return Ranking(order, mean[order].astype(np.float32), np.zeros(len(order), dtype=bool), ones, name)
        # theta ~ N(theta_hat, v^2 A^-1): with A = L L^T, L^-T eps has covariance A^-1. Column 0 acts;
        # the other, independent columns estimate the propensities.
        eps = rng.standard_normal((self._learner.dim, cfg.propensity_samples + 1))
        thetas = theta_hat[:, None] + cfg.prior_scale * np.linalg.solve(chol.T, eps)
        sampled = z @ thetas + base[:, None]
        if sim is None:
            order = np.argsort(-sampled[:, 0], kind="stable")[:k]
            return Ranking(order, sampled[order, 0].astype(np.float32), _greedy_pick_flags(order, mean),
                           _sample_propensities(sampled, order), name)
        lam = cfg.diversity_lambda
        relevance = _minmax_columns(sampled)
        order = mmr_order(relevance[:, 0], sim, lam, k)
        return Ranking(order, sampled[order, 0].astype(np.float32),
                       _mmr_greedy_flags(order, _minmax(mean), sim, lam),
                       _sample_propensities(relevance, order, sim, lam), name)

    def rank_cold(self, n: int, k: int, surface: int, retrieval: np.ndarray | None,
                  popularity: np.ndarray | None, rng: np.random.Generator,
                  similar: np.ndarray | None = None) -> Ranking:
        """Plackett-Luce sampling over a blend of popularity and retrieval relevance set by the surface;
        with diversity on and ``similar`` (n x any: the candidates' features) given, MMR inside it."""
        parts = []
        if popularity is not None:
            parts.append((POPULARITY_WEIGHT.get(surface, 0.5), _minmax(np.log1p(np.maximum(popularity, 0)))))
        if retrieval is not None:
            parts.append((1.0 - POPULARITY_WEIGHT.get(surface, 0.5), _minmax(retrieval.astype(np.float64))))
        total = sum(w for w, _ in parts)
        utility = sum((w / total * u for w, u in parts), np.zeros(n)) if total > 0 else np.zeros(n)
        if self.config.mmr and similar is not None and n > 1:
            return _cold_mmr(utility, _cosine(similar), self.config, k, rng)
        logits = utility / self.config.cold_start_temperature
        weights = np.exp(logits - logits.max())
        order = np.argsort(-(logits + rng.gumbel(size=n)))[:k]  # Gumbel-top-k = sequential softmax sampling
        picked = weights[order]
        remaining = weights.sum() - np.concatenate(([0.0], np.cumsum(picked)[:-1]))
        return Ranking(order, utility[order].astype(np.float32), _greedy_pick_flags(order, utility),
                       (picked / remaining).astype(np.float32), COLD_START)


class _Cosine:
    """Cosine similarities of the rows of ``features``, a row at a time (``sim[i]``: (n,)): a list needs only
    the rows of its k picks, k matrix-vector products instead of an n x n matrix. A zero row is similar to
    nothing."""

    def __init__(self, features: np.ndarray) -> None:
        f = np.asarray(features, dtype=np.float64)
        norms = np.linalg.norm(f, axis=1, keepdims=True)
        self._unit = np.divide(f, norms, out=np.zeros_like(f), where=norms > 0)
        self._rows: dict[int, np.ndarray] = {}

    def __len__(self) -> int:
        return self._unit.shape[0]

    def __getitem__(self, i: int) -> np.ndarray:
        row = self._rows.get(int(i))
        if row is None:
            row = self._rows[int(i)] = self._unit @ self._unit[int(i)]
        return row


def _cosine(features: np.ndarray) -> _Cosine:
    return _Cosine(features)


def _minmax_columns(values: np.ndarray) -> np.ndarray:
    lo, hi = values.min(axis=0, keepdims=True), values.max(axis=0, keepdims=True)
    span = hi - lo
    return np.divide(values - lo, span, out=np.zeros_like(values, dtype=np.float64), where=span > 0)


def mmr_order(relevance: np.ndarray, sim: np.ndarray | _Cosine, lam: float, k: int) -> np.ndarray:
    """The first ``k`` MMR picks: each the remaining item with the largest
    ``lam * relevance - (1 - lam) * (its largest similarity to the items above)``; ties to the lower index."""
    n = len(relevance)
    penalty = np.zeros(n)
    taken = np.zeros(n, dtype=bool)
    order = np.empty(min(k, n), dtype=np.int64)
    for pos in range(len(order)):
        score = np.where(taken, -np.inf, lam * relevance - (1.0 - lam) * penalty)
        pick = int(np.argmax(score))
        order[pos] = pick
        taken[pick] = True
        penalty = sim[pick] if pos == 0 else np.maximum(penalty, sim[pick])
    return order


def _penalties(order: np.ndarray, sim: np.ndarray | _Cosine) -> np.ndarray:
    """(len(order), n): row i = each item's largest similarity to ``order[:i]`` (0 for row 0)."""
    out = np.zeros((len(order), len(sim)))
    for pos in range(1, len(order)):
        out[pos] = sim[order[pos - 1]] if pos == 1 else np.maximum(out[pos - 1], sim[order[pos - 1]])
    return out


def _mmr_greedy_flags(order: np.ndarray, relevance: np.ndarray, sim: _Cosine, lam: float) -> np.ndarray:
    """For each position, whether the pick differs from (and scores below) what MMR over ``relevance`` would
    pick given the same items above."""
    flags = np.zeros(len(order), dtype=bool)
    taken = np.zeros(len(relevance), dtype=bool)
    for pos, (pick, pen) in enumerate(zip(order, _penalties(order, sim), strict=True)):
        score = np.where(taken, -np.inf, lam * relevance - (1.0 - lam) * pen)
        best = int(np.argmax(score))
        flags[pos] = best != pick and score[best] > score[pick]
        taken[pick] = True
    return flags


def _cold_mmr(utility: np.ndarray, sim: _Cosine, cfg: PolicyConfig, k: int, rng: np.random.Generator) -> Ranking:
    """Sequential softmax over MMR scores: the logged propensity is the softmax probability of each pick."""
    lam, n = cfg.diversity_lambda, len(utility)
    taken = np.zeros(n, dtype=bool)
    penalty = np.zeros(n)
    order = np.empty(k, dtype=np.int64)
    props = np.empty(k, dtype=np.float32)
    flags = np.zeros(k, dtype=bool)
    for pos in range(k):
        score = np.where(taken, -np.inf, lam * utility - (1.0 - lam) * penalty)
        logits = score / cfg.cold_start_temperature
        weights = np.exp(logits - logits.max())
        p = weights / weights.sum()
        pick = int(rng.choice(n, p=p))
        best = int(np.argmax(score))
        order[pos], props[pos] = pick, p[pick]
        flags[pos] = best != pick and score[best] > score[pick]
        taken[pick] = True
        penalty = sim[pick] if pos == 0 else np.maximum(penalty, sim[pick])
    return Ranking(order, utility[order].astype(np.float32), flags, props, COLD_START)


def _sample_propensities(sampled: np.ndarray, order: np.ndarray, sim: _Cosine | None = None,
                         lam: float = 1.0) -> np.ndarray:
    """P(item wins position i | the items above it), estimated over posterior draws 1..S.

    With ``sim`` (MMR): ``sampled`` holds each draw's relevance in [0, 1], and a draw's pick at position i is
    the argmax of ``lam * relevance - (1 - lam) * penalty_i``, the penalty being each item's largest
    similarity to ``order[:i]``: the same for every draw, so the counting below is unchanged.

    Column 0 is the draw that produced ``order``; counting it would overstate every propensity by about
    (1 - p) / (S + 1), so only the independent columns estimate. Position i is estimated over the columns
    whose own top i - 1 equal ``order[:i-1]`` (the condition), falling back to every column with the items
    above removed when none agrees. An item no column picks gets 1 / (2 S), not 0, so that inverse-
    propensity weights stay finite. (Measured against pick frequencies in test_rl_state_propensity.py.)"""
    scores = sampled[:, 1:].copy()
    draws = scores.shape[1]
    floor = 0.5 / draws
    agree = np.ones(draws, dtype=bool)
    out = np.empty(len(order), dtype=np.float32)
    penalties = None if sim is None else _penalties(order, sim)
    if sim is not None:
        scores *= lam
    for pos, pick in enumerate(order):
        winners = np.argmax(scores if penalties is None else scores - (1.0 - lam) * penalties[pos][:, None], axis=0)
        use = agree if agree.any() else np.ones(draws, dtype=bool)
        out[pos] = max(np.count_nonzero(winners[use] == pick) / np.count_nonzero(use), floor)
        agree &= winners == pick
        scores[pick, :] = -np.inf
    return out
