"""Diversity re-ranking (MMR, ``GMCO_RL_STATE_DIVERSITY_LAMBDA``): what it picks, and that the logged
propensities are those of the policy with MMR applied (position 1 and position 2 against pick frequencies,
with the tolerance of test_rl_state_propensity.py)."""

from __future__ import annotations

import numpy as np
import pytest
from gmco_common.config import ConfigError, load_settings
from gmco_rl_state.config import PREFIX, Settings
from gmco_rl_state.model import Event, Learner, ModelConfig
from gmco_rl_state.policy import COLD_START, GREEDY, THOMPSON, PolicyConfig, Ranker, mmr_order
from rl_state_testkit import homepage, make_settings, rank_request, serve, unit_vectors

CONFIG = ModelConfig(media_dim=32, bandit_dim=16, projection_seed=7, ridge=1.0, preference_rate=0.2,
                     seen_capacity=200)
RANKINGS = 6000


def _near_duplicates(rng: np.random.Generator) -> np.ndarray:
    """Eight candidates in four pairs of near-duplicates (cosine ~0.99 within a pair)."""
    centres = rng.standard_normal((4, 32))
    items = np.repeat(centres, 2, axis=0) + 0.1 * rng.standard_normal((8, 32))
    return (items / np.linalg.norm(items, axis=1, keepdims=True)).astype(np.float32)


def _state(learner: Learner, items: np.ndarray):
    """A user who liked both items of pair 0 and one of pair 1: pair 0's twins rank first and second
    without diversity."""
    events = [Event(f"e{i}", "u", i, 1.0, 0, 0, "", "", 0.0, items[j]) for i, j in enumerate([0, 1, 0, 1, 2])]
    return learner.decode(learner.apply(None, "u", events))


def test_mmr_order_by_hand() -> None:
    relevance = np.array([1.0, 0.95, 0.5])
    sim = np.array([[1.0, 0.99, 0.0], [0.99, 1.0, 0.0], [0.0, 0.0, 1.0]])
    assert mmr_order(relevance, sim, 1.0, 3).tolist() == [0, 1, 2]  # lambda 1: by relevance
    # lambda 0.5: item 1 scores 0.5 * 0.95 - 0.5 * 0.99 < 0 < 0.5 * 0.5 - 0 for item 2
    assert mmr_order(relevance, sim, 0.5, 3).tolist() == [0, 2, 1]


def test_lambda_one_is_the_plain_policy() -> None:
    learner = Learner(CONFIG)
    items = _near_duplicates(np.random.default_rng(0))
    state = _state(learner, items)
    plain = Ranker(learner, PolicyConfig(THOMPSON, 0.05, 1.0, 64, 0.1))
    off = Ranker(learner, PolicyConfig(THOMPSON, 0.05, 1.0, 64, 0.1, diversity_lambda=1.0))
    a = plain.rank_user(state, items, 4, np.random.default_rng(5))
    b = off.rank_user(state, items, 4, np.random.default_rng(5))
    assert a.indices.tolist() == b.indices.tolist()
    np.testing.assert_array_equal(a.propensities, b.propensities)


def test_mmr_spreads_the_list_over_the_pairs() -> None:
    learner = Learner(CONFIG)
    items = _near_duplicates(np.random.default_rng(0))
    state = _state(learner, items)
    pair = np.arange(8) // 2
    plain = Ranker(learner, PolicyConfig(GREEDY, 0.05, 1.0, 64, 0.1)).rank_user(state, items, 4,
                                                                                np.random.default_rng(0))
    diverse = Ranker(learner, PolicyConfig(GREEDY, 0.05, 1.0, 64, 0.1, diversity_lambda=0.3)).rank_user(
        state, items, 4, np.random.default_rng(0))
    assert len(set(pair[plain.indices[:2]])) == 1  # the twins of the liked pair come first without MMR
    assert len(set(pair[diverse.indices])) == 4  # one of each pair with it
    assert diverse.propensities.tolist() == [1.0] * 4 and not diverse.exploration.any()


def test_mmr_with_nothing_or_one_left_to_rank() -> None:
    learner = Learner(CONFIG)
    items = _near_duplicates(np.random.default_rng(0))
    state = _state(learner, items)
    for policy in (THOMPSON, GREEDY):
        ranker = Ranker(learner, PolicyConfig(policy, 0.05, 1.0, 64, 0.1, diversity_lambda=0.5))
        assert len(ranker.rank_user(state, items[:0], 0, np.random.default_rng(0)).indices) == 0
        assert ranker.rank_user(state, items[:1], 1, np.random.default_rng(0)).indices.tolist() == [0]


def _frequency_check(picks: np.ndarray, props: np.ndarray, n_items: int, label: str) -> list[str]:
    bad = []
    m = len(picks)
    for a in range(n_items):
        chose = picks == a
        f = chose.mean()
        if f < 0.01:
            continue
        tol = 4 * np.sqrt(f * (1 - f) / m) + 0.005
        if abs(props[chose].mean() - f) > tol:
            bad.append(f"{label} item {a}: frequency {f:.4f}, mean logged propensity {props[chose].mean():.4f}")
    return bad


def test_thompson_with_mmr_logs_the_propensities_of_what_it_does() -> None:
    learner = Learner(CONFIG)
    items = _near_duplicates(np.random.default_rng(0))
    state = _state(learner, items)
    ranker = Ranker(learner, PolicyConfig(THOMPSON, 0.5, 0.0, 64, 0.1, diversity_lambda=0.6))
    rng = np.random.default_rng(1)
    picks = np.empty((RANKINGS, 2), dtype=np.int64)
    props = np.empty((RANKINGS, 2))
    for i in range(RANKINGS):
        r = ranker.rank_user(state, items, 2, rng)
        picks[i], props[i] = r.indices, r.propensities
    bad = _frequency_check(picks[:, 0], props[:, 0], 8, "position 1")
    first = np.bincount(picks[:, 0], minlength=8)
    checked = 0
    for b in np.flatnonzero(first >= 1000):
        given = picks[:, 0] == b
        twin = b ^ 1
        # MMR at work: the first pick's near-duplicate is rarely second
        assert (picks[given, 1] == twin).mean() < 0.2
        bad += _frequency_check(picks[given, 1], props[given, 1], 8, f"position 2 | {b} first,")
        checked += 1
    assert checked >= 1
    assert not bad, "\n".join(bad)


def test_cold_start_with_mmr_logs_exact_softmax_propensities() -> None:
    """Sequential softmax over MMR scores: the logged propensity of the pick at position 2 given the first
    matches the frequency over repeated rankings."""
    rng = np.random.default_rng(3)
    items = _near_duplicates(rng)
    popularity = np.array([1.0, 0.9, 0.5, 0.45, 0.3, 0.28, 0.2, 0.1])
    ranker = Ranker(Learner(CONFIG), PolicyConfig(THOMPSON, 0.05, 1.0, 64, 0.3, diversity_lambda=0.5))
    picks = np.empty((RANKINGS, 2), dtype=np.int64)
    props = np.empty((RANKINGS, 2))
    for i in range(RANKINGS):
        r = ranker.rank_cold(8, 2, 1, None, popularity, rng, items)
        assert r.policy == COLD_START
        picks[i], props[i] = r.indices, r.propensities
    bad = _frequency_check(picks[:, 0], props[:, 0], 8, "position 1")
    b = int(np.bincount(picks[:, 0]).argmax())
    given = picks[:, 0] == b
    bad += _frequency_check(picks[given, 1], props[given, 1], 8, f"position 2 | {b} first,")
    assert (picks[given, 1] == (b ^ 1)).mean() < 0.2
    assert not bad, "\n".join(bad)


def test_setting_is_checked() -> None:
    assert load_settings(Settings, PREFIX, {f"{PREFIX}DIVERSITY_LAMBDA": "0.7"}).diversity_lambda == 0.7
    for bad in ("0", "1.5", "x"):
        with pytest.raises(ConfigError, match=f"{PREFIX}DIVERSITY_LAMBDA"):
            load_settings(Settings, PREFIX, {f"{PREFIX}DIVERSITY_LAMBDA": bad})


async def test_rank_applies_the_setting_to_cold_start(tmp_path) -> None:
    """Through the service: cold-start candidates in near-duplicate pairs, the most popular pair on top; with
    lambda 0.3 the top two are from different pairs far more often than without."""
    base = unit_vectors(4, seed=2)
    vectors = np.repeat(base, 2, axis=0) + 0.02 * unit_vectors(8, seed=3)
    popularity = [1.0, 0.99, 0.6, 0.59, 0.3, 0.29, 0.1, 0.09]
    ids = list(range(1, 9))
    split = {}
    for lam in (1.0, 0.3):
        async with serve(make_settings("sqlite", tmp_path / str(lam), diversity_lambda=lam)) as svc:
            different = 0
            for i in range(60):
                resp = await svc.stub.Rank(rank_request(f"new-{i}", ids, vectors, 2, popularities=popularity,
                                                        context=homepage()))
                a, b = (item.media_id - 1 for item in resp.items)
                different += a // 2 != b // 2
            split[lam] = different / 60
    assert split[0.3] > split[1.0] + 0.3, split
