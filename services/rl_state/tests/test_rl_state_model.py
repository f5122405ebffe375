"""Unit tests of the model update and the ranking policies (pure numpy, no I/O)."""

from __future__ import annotations

import numpy as np
import pytest
from gmco.common.v1 import common_pb2
from gmco_rl_state.model import Event, Learner, ModelConfig
from gmco_rl_state.policy import COLD_START, GREEDY, THOMPSON, PolicyConfig, Ranker
from rl_state_testkit import MEDIA_DIM, unit_vectors

CONFIG = ModelConfig(media_dim=MEDIA_DIM, bandit_dim=16, projection_seed=7, ridge=1.0, preference_rate=0.2,
                     seen_capacity=4)


def _event(i: int, media: int, reward: float, vector: np.ndarray | None) -> Event:
    return Event(f"e{i}", "u", media, reward, 0, 0, "", "", 0.0, vector)


def _ranker(policy: str = THOMPSON, samples: int = 256) -> Ranker:
    return Ranker(Learner(CONFIG), PolicyConfig(policy, 0.5, 1.0, samples, 0.1))


def test_projection_is_fixed_by_the_seed() -> None:
    assert np.array_equal(Learner(CONFIG).projection, Learner(CONFIG).projection)
    other = ModelConfig(**{**CONFIG.__dict__, "projection_seed": 8})
    assert not np.array_equal(Learner(CONFIG).projection, Learner(other).projection)


def test_apply_updates_bandit_preference_and_seen_ring() -> None:
    learner = Learner(CONFIG)
    vecs = unit_vectors(6, seed=1)
    row = learner.apply(None, "u", [_event(0, 10, 1.0, vecs[0]), _event(1, 11, -1.0, vecs[1])])
    state = learner.decode(row)
    assert (state.version, state.event_count) == (1, 2)
    assert float(state.pref @ vecs[0]) > 0.99  # only the positive item moved it
    z = learner.project(vecs[:2])
    np.testing.assert_allclose(state.a, np.eye(16) + z.T @ z, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(state.b, z[0] - z[1], rtol=1e-5, atol=1e-5)

    row = learner.apply(row, "u", [_event(2, 12, 1.0, vecs[2]), _event(3, 10, 0.0, None),
                                   _event(4, 13, 0.0, None), _event(5, 14, 0.0, None)])
    state2 = learner.decode(row)
    assert state2.version == 2 and state2.event_count == 6
    assert state2.seen.tolist() == [14, 13, 10, 12]  # most recent first, no repeats, capacity 4
    assert float(state2.pref @ vecs[2]) > float(state.pref @ vecs[2])  # moved towards the new positive


def test_encode_decode_round_trip() -> None:
    learner = Learner(CONFIG)
    row = learner.apply(None, "u", [_event(0, 2**64 - 1, 1.0, unit_vectors(1)[0])])
    assert learner.encode(learner.decode(row)) == row


def test_greedy_is_deterministic_without_exploration() -> None:
    learner = Learner(CONFIG)
    vecs = unit_vectors(30, seed=2)
    state = learner.decode(learner.apply(None, "u", [_event(0, 0, 1.0, vecs[0])]))
    ranking = _ranker(GREEDY).rank_user(state, vecs, 5, np.random.default_rng(0))
    assert ranking.policy == GREEDY and ranking.indices[0] == 0  # the liked item scores highest
    assert not ranking.exploration.any() and (ranking.propensities == 1).all()


def test_thompson_propensities_estimate_choice_frequencies() -> None:
    learner = Learner(CONFIG)
    vecs = unit_vectors(8, seed=3)
    state = learner.decode(learner.apply(None, "u", [_event(0, 0, 1.0, vecs[0]), _event(1, 1, -1.0, vecs[1])]))
    ranker = _ranker(samples=400)
    rng = np.random.default_rng(4)
    firsts = np.zeros(8)
    props = np.zeros(8)
    trials = 600
    for _ in range(trials):
        ranking = ranker.rank_user(state, vecs, 3, rng)
        assert ranking.policy == THOMPSON and ((ranking.propensities > 0) & (ranking.propensities <= 1)).all()
        firsts[ranking.indices[0]] += 1
        props[ranking.indices[0]] += ranking.propensities[0]
    # Over many draws the estimated first-position propensity matches how often each item came first.
    chosen = firsts > 0
    np.testing.assert_allclose(props[chosen] / firsts[chosen], firsts[chosen] / trials, atol=0.08)
    assert firsts.max() < trials  # it explores


def test_cold_start_propensities_are_exact_softmax() -> None:
    ranker = _ranker()
    pops = np.array([1.0, 10.0, 100.0, 1000.0])
    ranking = ranker.rank_cold(4, 2, common_pb2.SURFACE_HOMEPAGE, None, pops, np.random.default_rng(0))
    assert ranking.policy == COLD_START
    utility = np.log1p(pops)
    utility = (utility - utility.min()) / (utility.max() - utility.min())
    weights = np.exp(utility / 0.1)
    first = ranking.indices[0]
    assert ranking.propensities[0] == pytest.approx(weights[first] / weights.sum(), rel=1e-5)
    rest = weights.sum() - weights[first]
    assert ranking.propensities[1] == pytest.approx(weights[ranking.indices[1]] / rest, rel=1e-5)


def test_cold_start_mixes_popularity_with_the_surface() -> None:
    """Item 0 is popular but barely relevant, item 1 the reverse: the surface decides."""
    ranker = _ranker()
    pops = np.array([1000.0, 1.0, 1.0, 1.0])
    relevance = np.array([0.1, 0.9, 0.1, 0.1])
    rng = np.random.default_rng(5)

    def first_counts(surface: int) -> np.ndarray:
        counts = np.zeros(4)
        for _ in range(300):
            counts[ranker.rank_cold(4, 1, surface, relevance, pops, rng).indices[0]] += 1
        return counts

    home, search = first_counts(common_pb2.SURFACE_HOMEPAGE), first_counts(common_pb2.SURFACE_SEARCH_RESULTS)
    assert home.argmax() == 0 and search.argmax() == 1


def test_cold_start_without_signals_is_uniform() -> None:
    ranking = _ranker().rank_cold(5, 5, 0, None, None, np.random.default_rng(6))
    np.testing.assert_allclose(ranking.propensities, [1 / 5, 1 / 4, 1 / 3, 1 / 2, 1.0], rtol=1e-6)
    assert not ranking.exploration.any()
