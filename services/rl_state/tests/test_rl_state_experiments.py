"""Policy experiments: stable assignment, configuration parsing, counters and the canary guard (unit), and the
guard's detection time and false-rollback rate in simulation."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from gmco_common.errors import InvalidArgument
from gmco_rl_state.experiments import (
    Arm,
    ExperimentConfig,
    ExperimentCounters,
    GuardConfig,
    PolicyCounters,
    bucket,
    check_canary,
    load_config,
    parse_config,
)
from gmco_rl_state.simulate import simulate_guard

USERS = [f"user-{i}" for i in range(20_000)]


def canary_config(share: float, salt: str = "exp-1", **guard: float) -> ExperimentConfig:
    return ExperimentConfig((Arm("thompson", 1 - share), Arm("v2", share)), control="thompson", canary="v2",
                            salt=salt, guard=GuardConfig(**guard))


# --- assignment -----------------------------------------------------------------------------------------
def test_bucket_is_pinned() -> None:
    """The hash is part of the contract: changing it reassigns every user in a running experiment."""
    assert bucket("user-0", "exp-1") == 0.20416612779440668
    assert bucket("alice", "exp-1") == 0.1991811848047657
    assert bucket("user-0") == 0.5403602982692997
    assert bucket("user-0", "exp-2") != bucket("user-0", "exp-1")


def test_assignment_is_the_same_in_another_process() -> None:
    """Another interpreter (another router, or this one restarted) with another hash seed assigns alike."""
    config = canary_config(0.3)
    here = [config.assign(u) for u in USERS[:2000]]
    script = ("import json, sys; from gmco_rl_state.experiments import load_config; "
              "c = load_config(__import__('pathlib').Path(sys.argv[1])); "
              "print(json.dumps([c.assign(f'user-{i}') for i in range(2000)]))")
    path = Path(os.environ.get("TMPDIR", "/tmp")) / f"gmco-exp-{os.getpid()}.json"
    path.write_text(json.dumps(config.to_dict()))
    try:
        env = {**os.environ, "PYTHONHASHSEED": "12345", "PYTHONPATH": os.pathsep.join(sys.path)}
        proc = subprocess.run([sys.executable, "-c", script, str(path)], check=True, capture_output=True, text=True,
                              env=env, timeout=120)
    finally:
        path.unlink()
    assert json.loads(proc.stdout) == here


def test_weights_are_respected() -> None:
    config = ExperimentConfig((Arm("a", 50), Arm("b", 30), Arm("c", 20)), control="a", salt="s")
    got = np.array([config.assign(u) for u in USERS])
    for name, share in (("a", 0.5), ("b", 0.3), ("c", 0.2)):
        assert np.mean(got == name) == pytest.approx(share, abs=4 * np.sqrt(share * (1 - share) / len(USERS)))


def test_ramping_and_rolling_back_move_only_the_canary_users() -> None:
    five, ten = canary_config(0.05), canary_config(0.10)
    at5 = {u for u in USERS if five.assign(u) == "v2"}
    at10 = {u for u in USERS if ten.assign(u) == "v2"}
    assert at5 < at10
    assert len(at10) == pytest.approx(0.1 * len(USERS), rel=0.1)
    three = ExperimentConfig((Arm("b", 30), Arm("thompson", 60), Arm("v2", 10)), control="thompson", canary="v2")
    back = three.rolled_back()
    assert back.weight("v2") == 0 and back.weight("thompson") == pytest.approx(0.7)
    for u in USERS[:5000]:
        before, after = three.assign(u), back.assign(u)
        assert after == ("thompson" if before == "v2" else before)


# --- configuration --------------------------------------------------------------------------------------
def test_config_from_json_and_yaml(tmp_path: Path) -> None:
    doc = {"salt": "ranker-1", "control": "thompson", "canary": "v2", "arms": {"thompson": 95, "v2": 5},
           "guard": {"margin": 0.002, "confidence": 0.99, "min_impressions": 1000}}
    (tmp_path / "e.json").write_text(json.dumps(doc))
    (tmp_path / "e.yaml").write_text(
        "salt: ranker-1\ncontrol: thompson\ncanary: v2\narms:\n  - {name: thompson, weight: 95}\n"
        "  - {name: v2, weight: 5}\nguard: {margin: 0.002, confidence: 0.99, min_impressions: 1000}\n")
    a, b = load_config(tmp_path / "e.json"), load_config(tmp_path / "e.yaml")
    assert a == b and a.weight("v2") == pytest.approx(0.05)
    assert a.guard == GuardConfig(margin=0.002, confidence=0.99, min_impressions=1000)
    assert a.digest() == b.digest() and a.digest() != a.rolled_back().digest()


@pytest.mark.parametrize(("doc", "field"), [
    ({"arms": {"a": 1}}, "control"),
    ({"arms": {"a": 1}, "control": "b"}, "control"),
    ({"arms": {"a": -1, "b": 2}, "control": "b"}, "arms.a"),
    ({"arms": {"a": 0}, "control": "a"}, "arms"),
    ({"arms": {"a": 1, "b": 1}, "control": "a", "canary": "a"}, "canary"),
    ({"arms": {"a": 1, "b": 1}, "control": "a", "canary": "c"}, "canary"),
    ({"arms": {"a": 1}, "control": "a", "guard": {"confidence": 1.0}}, "guard.confidence"),
    ({"arms": {"a": 1}, "control": "a", "guard": {"margin": "x"}}, "guard.margin"),
    ({"arms": {"a": 1}, "control": "a", "guard": {"alpha": 0.1}}, "guard.alpha"),
    ({"arms": {"a": 1}, "control": "a", "wat": 1}, "wat"),
    ({"arms": [{"name": "a"}], "control": "a"}, "arms"),
])
def test_bad_configs_name_the_field(doc: dict, field: str) -> None:
    with pytest.raises(InvalidArgument) as err:
        parse_config(doc)
    assert err.value.field == field


def test_counters() -> None:
    counters = ExperimentCounters()
    for r, p in ((1.0, 0.5), (0.0, 0.25), (-1.0, 0.25)):
        counters.record("a", r, p)
    a = counters.get("a")
    assert (a.impressions, a.reward_sum, a.reward_sq_sum) == (3, 0.0, 2.0)
    assert a.mean_propensity == pytest.approx(1 / 3) and a.reward_rate == 0.0
    assert counters.get("unknown") == PolicyCounters()
    a.merge(PolicyCounters(1, 1.0, 1.0, 1.0))
    assert a.impressions == 4 and a.reward_rate == 0.25


# --- the guard ------------------------------------------------------------------------------------------
def _counters(rng: np.random.Generator, n_control: int, control_rate: float, n_canary: int,
              canary_rate: float) -> ExperimentCounters:
    out = ExperimentCounters()
    for name, n, rate in (("thompson", n_control, control_rate), ("v2", n_canary, canary_rate)):
        clicks = float(rng.binomial(n, rate))
        out.by_policy[name] = PolicyCounters(n, clicks, clicks, 0.1 * n)
    return out


def test_guard_rolls_back_a_worse_canary() -> None:
    config = canary_config(0.1)
    decision = check_canary(config, _counters(np.random.default_rng(0), 180_000, 0.04, 20_000, 0.03))
    assert decision is not None and decision.rollback
    assert "rolling back" in decision.reason and "'v2'" in decision.reason
    assert decision.log_likelihood_ratio >= decision.threshold


def test_guard_keeps_an_equal_canary_and_waits_for_data() -> None:
    config = canary_config(0.1)
    for seed in range(20):
        decision = check_canary(config, _counters(np.random.default_rng(seed), 180_000, 0.04, 20_000, 0.04))
        assert decision is not None and not decision.rollback, decision.reason
    early = check_canary(config, _counters(np.random.default_rng(0), 5000, 0.04, 400, 0.0))
    assert early is not None and not early.rollback and early.reason.startswith("waiting")
    assert check_canary(ExperimentConfig((Arm("a", 1),), control="a"), ExperimentCounters()) is None


def test_guard_tolerates_a_shortfall_within_the_margin() -> None:
    # canary 0.038 against 0.040 over 400k / 3.6M impressions: 6 standard errors below
    counters = ExperimentCounters({"thompson": PolicyCounters(3_600_000, 144_000.0, 144_000.0),
                                   "v2": PolicyCounters(400_000, 15_200.0, 15_200.0)})
    assert check_canary(canary_config(0.1), counters).rollback
    assert not check_canary(canary_config(0.1, margin=0.003), counters).rollback


def test_guard_simulation_detection_time_and_false_rollbacks() -> None:
    """Canary at 10% of traffic, control click rate 4%, guard checked every 1,000 impressions, 2M
    impressions at most, 400 runs each: a canary 20% worse is rolled back in every run; an equal one in at
    most 5% of runs (the guard's bound is 1 - confidence = 5%)."""
    guard = GuardConfig()
    bad = simulate_guard(guard, 0.04, 0.032, 0.1, max_impressions=2_000_000, runs=400, seed=1)
    equal = simulate_guard(guard, 0.04, 0.04, 0.1, max_impressions=2_000_000, runs=400, seed=2)
    print(f"worse canary: rolled back in {bad.rollback_rate:.1%} of runs, median after "
          f"{np.nanmedian(bad.impressions):.0f} impressions ({np.nanmedian(bad.canary_impressions):.0f} on the "
          f"canary); equal canary: false rollbacks {equal.rollback_rate:.1%}")
    assert bad.rollback_rate == 1.0
    assert equal.rollback_rate <= 0.05


def test_simulated_and_unit_guard_agree() -> None:
    """The simulation's vectorised statistic is the guard's: each run's counters when it stopped give the
    same decision through check_canary."""
    config = canary_config(0.1)
    runs = simulate_guard(config.guard, 0.04, 0.035, 0.1, max_impressions=100_000, runs=60, seed=4)
    assert 0 < runs.rollback_rate < 1
    f = runs.final
    for i in range(60):
        counters = ExperimentCounters({
            "v2": PolicyCounters(int(f["n_canary"][i]), f["clicks_canary"][i], f["clicks_canary"][i]),
            "thompson": PolicyCounters(int(f["n_control"][i]), f["clicks_control"][i], f["clicks_control"][i])})
        assert check_canary(config, counters).rollback == runs.rolled_back[i]
