"""Ranking policies: linear Thompson sampling (or greedy) for known users, popularity + context for cold start.

Every policy returns, per chosen item, the probability with which it was chosen at its position given
the items above it (the propensity, for offline inverse-propensity evaluation) and whether the pick
departed from what the greedy choice would have been at that position (the exploration flag).
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
        return self.rank_features(state, self._learner.project(vectors), preference, k, rng)

    def rank_features(self, state: UserState, z: np.ndarray, preference: np.ndarray | None, k: int,
                      rng: np.random.Generator) -> Ranking:
        """Top ``k`` of candidates given as bandit features ``z`` (n x d) and their similarity to the user's
        vector (``preference``; None when the user has none yet)."""
        cfg = self.config
        z = np.asarray(z, dtype=np.float64)
        base = np.zeros(len(z))
        if preference is not None and state.pref is not None and cfg.preference_weight > 0:
            base = cfg.preference_weight * np.asarray(preference, dtype=np.float64)
        chol = np.linalg.cholesky(state.a)
        theta_hat = np.linalg.solve(chol.T, np.linalg.solve(chol, state.b))
        mean = z @ theta_hat + base
        if cfg.policy == GREEDY:
            order = np.argsort(-mean, kind="stable")[:k]
            ones = np.ones(len(order), dtype=np.float32)
            return Ranking(order, mean[order].astype(np.float32), np.zeros(len(order), dtype=bool), ones, GREEDY)
        # theta ~ N(theta_hat, v^2 A^-1): with A = L L^T, L^-T eps has covariance A^-1. Column 0 acts;
        # the other, independent columns estimate the propensities.
        eps = rng.standard_normal((self._learner.dim, cfg.propensity_samples + 1))
        thetas = theta_hat[:, None] + cfg.prior_scale * np.linalg.solve(chol.T, eps)
        sampled = z @ thetas + base[:, None]
        order = np.argsort(-sampled[:, 0], kind="stable")[:k]
        return Ranking(order, sampled[order, 0].astype(np.float32), _greedy_pick_flags(order, mean),
                       _sample_propensities(sampled, order), THOMPSON)

    def rank_cold(self, n: int, k: int, surface: int, retrieval: np.ndarray | None,
                  popularity: np.ndarray | None, rng: np.random.Generator) -> Ranking:
        """Plackett-Luce sampling over a blend of popularity and retrieval relevance set by the surface."""
        parts = []
        if popularity is not None:
            parts.append((POPULARITY_WEIGHT.get(surface, 0.5), _minmax(np.log1p(np.maximum(popularity, 0)))))
        if retrieval is not None:
            parts.append((1.0 - POPULARITY_WEIGHT.get(surface, 0.5), _minmax(retrieval.astype(np.float64))))
        total = sum(w for w, _ in parts)
        utility = sum((w / total * u for w, u in parts), np.zeros(n)) if total > 0 else np.zeros(n)
        logits = utility / self.config.cold_start_temperature
        weights = np.exp(logits - logits.max())
        order = np.argsort(-(logits + rng.gumbel(size=n)))[:k]  # Gumbel-top-k = sequential softmax sampling
        picked = weights[order]
        remaining = weights.sum() - np.concatenate(([0.0], np.cumsum(picked)[:-1]))
        return Ranking(order, utility[order].astype(np.float32), _greedy_pick_flags(order, utility),
                       (picked / remaining).astype(np.float32), COLD_START)


def _sample_propensities(sampled: np.ndarray, order: np.ndarray) -> np.ndarray:
    """P(item wins position i | the items above it), estimated over posterior draws 1..S.

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
    for pos, pick in enumerate(order):
        winners = np.argmax(scores, axis=0)
        use = agree if agree.any() else np.ones(draws, dtype=bool)
        out[pos] = max(np.count_nonzero(winners[use] == pick) / np.count_nonzero(use), floor)
        agree &= winners == pick
        scores[pick, :] = -np.inf
    return out
