"""Policy experiments in the service (gmco_rl_state.rollout): assignment stable across instances and restarts,
the watched file's changes seen within a bounded time, the policy stored with each feedback event, per-policy
metrics, and the canary guard on simulated counters (fires on a worse canary, not on an equal one)."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import sqlite3
import time
from pathlib import Path

import numpy as np
import pytest
from gmco.rl_state.v1 import rl_state_service_pb2 as pb
from gmco_common.config import ConfigError
from gmco_rl_state.experiments import load_config
from gmco_rl_state.model import Learner, ModelConfig
from gmco_rl_state.policy import COLD_START, PolicyConfig, Ranker
from gmco_rl_state.rollout import Rollout
from prometheus_client import REGISTRY
from rl_state_testkit import event, homepage, make_settings, rank_request, serve, unit_vectors

USERS = [f"user-{i}" for i in range(40)]
AB = {"salt": "t1", "control": "thompson", "canary": "diverse", "arms": {"thompson": 50, "diverse": 50},
      "policies": {"diverse": {"policy": "thompson", "diversity_lambda": 0.7}}}


def _write(path: Path, doc: dict, mtime: float | None = None) -> Path:
    path.write_text(json.dumps(doc))
    if mtime is not None:  # a distinct mtime even on file systems with coarse timestamps
        os.utime(path, (mtime, mtime))
    return path


def _metric(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def _rollout(path: Path | None) -> Rollout:
    learner = Learner(ModelConfig(64, 16, 7, 1.0, 0.2, 200))
    r = Rollout(PolicyConfig("thompson", 0.05, 1.0, 16, 0.1), lambda cfg: Ranker(learner, cfg), path)
    r.start()
    return r


async def _with_state(stub, users: list[str]) -> None:
    vectors = unit_vectors(len(users), seed=9)
    await stub.RecordFeedback(pb.RecordFeedbackRequest(events=[
        event(f"warm-{u}", u, 10_000 + i, 1.0, vectors[i]) for i, u in enumerate(users)]))


async def _policies(stub, users: list[str]) -> dict[str, str]:
    vectors = unit_vectors(6, seed=1)
    out = {}
    for u in users:
        resp = await stub.Rank(rank_request(u, list(range(1, 7)), vectors, 3))
        out[u] = resp.policy
    return out


async def test_assignment_is_stable_across_instances_and_restarts(tmp_path: Path) -> None:
    path = _write(tmp_path / "exp.json", AB)
    expected = {u: load_config(path).assign(u) for u in USERS}
    assert set(expected.values()) == {"thompson", "diverse"}
    settings = make_settings("sqlite", tmp_path, experiments_file=path)
    async with serve(settings) as svc:
        await _with_state(svc.stub, USERS)
        first = await _policies(svc.stub, USERS)
    async with serve(settings) as svc:  # a restart, same database and file
        after_restart = await _policies(svc.stub, USERS)
    other = make_settings("sqlite", tmp_path / "other", experiments_file=path)
    async with serve(other) as svc:  # another instance with its own state
        await _with_state(svc.stub, USERS)
        elsewhere = await _policies(svc.stub, USERS)
    assert first == after_restart == elsewhere == expected
    # and independently of the process: a fresh Rollout gives the same arms
    assert {u: _rollout(path).ranker(u).config.name for u in USERS} == expected


async def test_a_config_change_is_applied_within_the_poll_period(tmp_path: Path) -> None:
    path = _write(tmp_path / "exp.json", {"control": "thompson", "arms": {"thompson": 1}}, mtime=1_000_000)
    settings = make_settings("sqlite", tmp_path, experiments_file=path, experiments_poll_seconds=0.1)
    async with serve(settings) as svc:
        await _with_state(svc.stub, USERS[:5])
        assert set((await _policies(svc.stub, USERS[:5])).values()) == {"thompson"}
        _write(path, {"control": "greedy", "arms": {"greedy": 1, "thompson": 0}}, mtime=1_000_010)
        written = time.monotonic()
        while set((await _policies(svc.stub, USERS[:5])).values()) != {"greedy"}:
            assert time.monotonic() - written < 5.0, "the new assignment was not applied"
            await asyncio.sleep(0.02)
        # a file that no longer parses is refused, and the running configuration stays
        invalid = _metric("gmco_rl_state_experiment_reloads_total", outcome="invalid")
        path.write_text("{not json")
        os.utime(path, (1_000_020, 1_000_020))
        deadline = time.monotonic() + 5.0
        while _metric("gmco_rl_state_experiment_reloads_total", outcome="invalid") == invalid:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.02)
        assert set((await _policies(svc.stub, USERS[:5])).values()) == {"greedy"}


def test_a_bad_file_fails_the_start_naming_the_setting(tmp_path: Path) -> None:
    path = _write(tmp_path / "exp.json", {"control": "nope", "arms": {"nope": 1}})
    with pytest.raises(ConfigError, match="GMCO_RL_STATE_EXPERIMENTS_FILE.*arms.nope"):
        _rollout(path)
    with pytest.raises(ConfigError, match="GMCO_RL_STATE_EXPERIMENTS_FILE"):
        _rollout(tmp_path / "missing.json")


async def test_feedback_is_logged_with_the_policy_that_showed_the_item(tmp_path: Path) -> None:
    path = _write(tmp_path / "exp.json", AB)
    settings = make_settings("sqlite", tmp_path, experiments_file=path)
    vectors = unit_vectors(6, seed=1)
    async with serve(settings) as svc:
        # a first-time user: the cold-start policy shows the items
        cold = await svc.stub.Rank(rank_request("newcomer", list(range(1, 7)), vectors, 2, context=homepage(),
                                                popularities=[6, 5, 4, 3, 2, 1]))
        assert cold.policy == COLD_START
        await svc.stub.RecordFeedback(pb.RecordFeedbackRequest(events=[
            event("n1", "newcomer", cold.items[0].media_id, 1.0, vectors[cold.items[0].media_id - 1],
                  propensity=cold.items[0].propensity)]))
        await _with_state(svc.stub, USERS[:6])
        shown = {}
        for u in USERS[:6]:
            resp = await svc.stub.Rank(rank_request(u, list(range(1, 7)), vectors, 2))
            shown[u] = resp.policy
            await svc.stub.RecordFeedback(pb.RecordFeedbackRequest(events=[
                event(f"{u}-click", u, resp.items[0].media_id, 1.0, propensity=resp.items[0].propensity)]))
    with sqlite3.connect(settings.sqlite_path) as conn:
        logged = dict(conn.execute("SELECT event_id, policy FROM feedback_event"))
    assert logged["n1"] == COLD_START
    assert {u: logged[f"{u}-click"] for u in shown} == shown
    assert set(shown.values()) == {"thompson", "diverse"}


def _simulate(rollout: Rollout, control_rate: float, canary_rate: float, impressions: int, seed: int) -> None:
    """Impressions split by assignment, one item each, rewarded by Bernoulli draws."""
    rng = np.random.default_rng(seed)
    assert rollout.config is not None
    for i in range(impressions):
        user = f"sim-{seed}-{i}"
        policy = rollout.config.assign(user)
        rollout.shown(user, policy, [1], np.array([0.5]))
        rate = canary_rate if policy == rollout.config.canary else control_rate
        if rng.random() < rate:
            rollout.rewarded(policy, [1.0])


def test_guard_rolls_back_a_worse_canary(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = _write(tmp_path / "exp.json", {**AB, "arms": {"thompson": 80, "diverse": 20}})
    rollout = _rollout(path)
    canary_users = [u for u in USERS if rollout.config.assign(u) == "diverse"]
    assert canary_users
    before = _metric("gmco_rl_state_canary_rollbacks_total", canary="diverse")
    _simulate(rollout, 0.10, 0.05, 20_000, seed=1)
    with caplog.at_level(logging.WARNING, logger="gmco_rl_state.rollout"):
        decision = rollout.check()
    assert decision is not None and decision.rollback, decision
    assert rollout.rolled_back and rollout.config.weight("diverse") == 0
    assert _metric("gmco_rl_state_canary_rollbacks_total", canary="diverse") == before + 1
    assert "rolling back" in caplog.text and "'diverse'" in caplog.text
    assert all(rollout.ranker(u).config.name == "thompson" for u in canary_users)
    assert _metric("gmco_rl_state_experiment_weight_ratio", policy="diverse") == 0
    # per-policy gauges from the same counters
    rate = _metric("gmco_rl_state_policy_reward_rate_ratio", policy="diverse")
    assert 0.03 < rate < 0.07
    assert _metric("gmco_rl_state_policy_mean_propensity_ratio", policy="thompson") == pytest.approx(0.5)
    # the same file touched again keeps the rollback; a changed file is a new decision
    os.utime(path, (2_000_000, 2_000_000))
    assert not rollout.reload() and rollout.rolled_back
    _write(path, {**AB, "arms": {"thompson": 90, "diverse": 10}})
    assert rollout.reload() and not rollout.rolled_back and rollout.config.weight("diverse") == pytest.approx(0.1)


def test_guard_keeps_an_equal_canary(tmp_path: Path) -> None:
    rollout = _rollout(_write(tmp_path / "exp.json", {**AB, "arms": {"thompson": 80, "diverse": 20}}))
    for seed in range(3):
        _simulate(rollout, 0.10, 0.10, 10_000, seed=10 + seed)
        decision = rollout.check()
        assert decision is not None and not decision.rollback, decision.reason
    assert not rollout.rolled_back and rollout.config.weight("diverse") == pytest.approx(0.2)


def test_without_a_file_everyone_gets_the_settings_policy() -> None:
    rollout = _rollout(None)
    assert rollout.config is None and rollout.check() is None
    assert rollout.ranker("anyone").config.policy == "thompson"
    assert rollout.policy_of("anyone", 5) == "thompson"


async def test_the_service_rolls_a_worse_canary_back_on_its_own(tmp_path: Path) -> None:
    """The wiring end to end: Rank counts impressions per arm, RecordFeedback credits the rewards to the arm
    that showed the item, and the supervised job's guard rolls the canary back; its users then get the
    control."""
    doc = {"salt": "svc", "control": "thompson", "canary": "greedy", "arms": {"thompson": 50, "greedy": 50},
           "guard": {"min_impressions": 30, "confidence": 0.95, "mixture_scale": 0.5}}
    path = _write(tmp_path / "exp.json", doc)
    config = load_config(path)
    settings = make_settings("sqlite", tmp_path, experiments_file=path, experiments_poll_seconds=0.05)
    vectors = unit_vectors(6, seed=1)
    before = _metric("gmco_rl_state_canary_rollbacks_total", canary="greedy")
    async with serve(settings) as svc:
        await _with_state(svc.stub, USERS)
        canary_users = [u for u in USERS if config.assign(u) == "greedy"]
        assert canary_users and len(canary_users) < len(USERS)
        for round_ in range(3):
            for u in USERS:
                resp = await svc.stub.Rank(rank_request(u, list(range(1, 7)), vectors, 2))
                reward = 0.0 if resp.policy == "greedy" else 1.0  # the canary's items are never clicked
                await svc.stub.RecordFeedback(pb.RecordFeedbackRequest(events=[
                    event(f"{u}-{round_}-{item.media_id}", u, item.media_id, reward) for item in resp.items]))
        deadline = time.monotonic() + 5.0
        while _metric("gmco_rl_state_canary_rollbacks_total", canary="greedy") == before:
            assert time.monotonic() < deadline, "the guard did not roll the canary back"
            await asyncio.sleep(0.02)
        assert set((await _policies(svc.stub, canary_users)).values()) == {"thompson"}
