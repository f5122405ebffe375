"""Policy experiments in the running service: which ranker answers a user, what each policy showed and
earned, the watched configuration file and the canary guard (the logic is ``gmco_rl_state.experiments``).

- **Assignment.** With ``GMCO_RL_STATE_EXPERIMENTS_FILE`` set, a user with state is ranked by the arm
  ``ExperimentConfig.assign`` gives them: a stable hash of the user id, so every rl_state process (and the
  same one after a restart) puts a user on the same policy for the same file. Users without state are
  ranked by the cold-start policy and are outside the experiment. Without the file, every user with state
  gets the settings' policy (``GMCO_RL_STATE_POLICY``), under that name.
- **Reloads.** A supervised periodic job (every ``GMCO_RL_STATE_EXPERIMENTS_POLL_SECONDS``) compares the
  file's modification time and size with the last ones read and reloads on a change: a new assignment is
  in effect at most one period (plus the file system's mtime granularity) after the write. A file that no
  longer parses is logged and counted (``gmco_rl_state_experiment_reloads_total{outcome="invalid"}``) and the
  previous configuration stays; at start an invalid file is a configuration error naming the setting.
- **What is logged.** Rank reports the arm's name as ``RankResponse.policy`` (``cold_start`` for users
  without state). Each feedback event is stored with the policy that showed its item
  (``feedback_event.policy``, read by ``gmco ope --policy``): the one remembered from this process's
  recent Rank answers for that (user, item), else the user's current arm (correct unless the assignment
  changed in between, or the item was a cold-start pick ranked by another rl_state process).
- **Metrics**, per policy: ``gmco_rl_state_policy_impressions_total``, ``..._propensity_sum_total`` and
  ``..._feedback_events_total`` (counters), ``..._reward_sum`` (a gauge: rewards can be negative), and the gauges
  ``gmco_rl_state_policy_reward_rate_ratio`` (reward per impression) and
  ``gmco_rl_state_policy_mean_propensity_ratio``, refreshed each period; ``gmco_rl_state_experiment_weight_ratio``
  is each arm's share of users now.
- **The guard.** Each period the canary is checked against the control with ``experiments.check_canary``
  over this process's counters (an impression without feedback counts as reward 0). On a rollback the
  canary's weight goes to the control in memory, a warning says why, and
  ``gmco_rl_state_canary_rollbacks_total{canary}`` is bumped. The rollback holds while the file is unchanged;
  to end the experiment for good, set the canary's weight to 0 in the file. Each process decides on its own
  traffic, so with several rl_state replicas each rolls back when its own share of the evidence suffices.
  Counters start afresh when the salt, control or canary changes (another experiment), not on a ramp.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
from gmco_common.config import ConfigError
from gmco_common.errors import InvalidArgument
from gmco_common.lru import TtlLru

from gmco_rl_state import metrics
from gmco_rl_state.experiments import (
    ExperimentConfig,
    ExperimentCounters,
    GuardDecision,
    PolicyCounters,
    check_canary,
    load_config,
)
from gmco_rl_state.policy import PolicyConfig, Ranker

log = logging.getLogger("gmco_rl_state.rollout")

SETTING = "GMCO_RL_STATE_EXPERIMENTS_FILE"


class Rollout:
    def __init__(self, base: PolicyConfig, make_ranker: Callable[[PolicyConfig], Ranker], path: Path | None = None,
                 memo_size: int = 200_000, memo_ttl: float = 3600.0) -> None:
        self._base = base
        self._make_ranker = make_ranker
        self.path = path
        self.config: ExperimentConfig | None = None
        self.rolled_back = False
        self.counters = ExperimentCounters()
        self._default = make_ranker(base)
        self._rankers: dict[str, Ranker] = {}
        self._stamp: tuple[int, int] | None = None
        self._loaded_digest: str | None = None  # of the file's configuration (before any rollback)
        self._shown: TtlLru[tuple[str, int], str] = TtlLru(memo_size, memo_ttl)
        self.last_decision: GuardDecision | None = None

    # --- configuration --------------------------------------------------------------------------------
    def start(self) -> None:
        """The first load: a bad file is a configuration error naming the setting."""
        if self.path is None:
            return
        try:
            self.reload()
        except (InvalidArgument, OSError, ValueError) as exc:
            raise ConfigError(f"{SETTING}={self.path}: {exc}") from exc

    async def poll(self) -> bool:
        """Reload when the file changed (the periodic job; the file is read off the event loop, the new
        configuration applied on it); an unreadable or invalid file keeps the current configuration.
        Returns whether a new configuration was applied."""
        if self.path is None:
            return False
        try:
            read = await asyncio.to_thread(self._read)
            return False if read is None else self._apply(*read)
        except (InvalidArgument, OSError, ValueError) as exc:
            metrics.EXPERIMENT_RELOADS.labels("invalid").inc()
            log.error("experiments file %s not applied, keeping the previous configuration: %s", self.path, exc)
            return False

    def reload(self) -> bool:
        read = self._read()
        return False if read is None else self._apply(*read)

    def _read(self) -> tuple[tuple[int, int], ExperimentConfig] | None:
        assert self.path is not None
        st = os.stat(self.path)
        stamp = (st.st_mtime_ns, st.st_size)
        if stamp == self._stamp:
            return None
        return stamp, load_config(self.path)

    def _apply(self, stamp: tuple[int, int], config: ExperimentConfig) -> bool:
        rankers = {arm.name: self._ranker_for(config, arm.name) for arm in config.arms}
        self._stamp = stamp
        digest = config.digest()
        if digest == self._loaded_digest:
            return False  # touched, not changed: a rollback stays
        old = self.config
        if old is None or (old.salt, old.control, old.canary) != (config.salt, config.control, config.canary):
            self.counters = ExperimentCounters()
        self._loaded_digest = digest
        self.config, self._rankers, self.rolled_back = config, rankers, False
        self._refresh_weights()
        metrics.EXPERIMENT_RELOADS.labels("applied").inc()
        log.info("experiments: applied %s (%s): arms %s, control %s, canary %s", self.path, digest,
                 {a.name: round(config.weight(a.name), 4) for a in config.arms}, config.control, config.canary)
        return True

    def _ranker_for(self, config: ExperimentConfig, name: str) -> Ranker:
        spec = config.policy(name)
        return self._make_ranker(dataclasses.replace(self._base, policy=spec.base, name=name, **dict(spec.overrides)))

    def _refresh_weights(self) -> None:
        if self.config is not None:
            for arm in self.config.arms:
                metrics.EXPERIMENT_WEIGHT.labels(arm.name).set(self.config.weight(arm.name))

    # --- serving --------------------------------------------------------------------------------------
    def ranker(self, user_id: str) -> Ranker:
        """The ranker of a user with state."""
        if self.config is None:
            return self._default
        return self._rankers[self.config.assign(user_id)]

    @property
    def cold(self) -> Ranker:
        return self._default

    def shown(self, user_id: str, policy: str, media_ids: Sequence[int], propensities: np.ndarray) -> None:
        """A Rank answer: counted for ``policy``, and remembered per (user, item) for the feedback log."""
        self.counters.by_policy.setdefault(policy, PolicyCounters()).show(propensities)
        metrics.POLICY_IMPRESSIONS.labels(policy).inc(len(media_ids))
        metrics.POLICY_PROPENSITY_SUM.labels(policy).inc(float(np.sum(propensities)))
        for media_id in media_ids:
            self._shown.put((user_id, int(media_id)), policy)

    def policy_of(self, user_id: str, media_id: int) -> str:
        """The policy that showed ``media_id`` to ``user_id``: remembered, else the user's arm now."""
        remembered = self._shown.get((user_id, int(media_id)))
        if remembered is not None:
            return remembered
        if self.config is None:
            return self._base.name or self._base.policy
        return self.config.assign(user_id)

    def rewarded(self, policy: str, rewards: Sequence[float]) -> None:
        self.counters.by_policy.setdefault(policy, PolicyCounters()).reward(rewards)
        metrics.POLICY_FEEDBACK.labels(policy).inc(len(rewards))
        metrics.POLICY_REWARD_SUM.labels(policy).inc(float(np.sum(rewards)))

    # --- the periodic job -----------------------------------------------------------------------------
    def check(self) -> GuardDecision | None:
        """Refresh the per-policy gauges and run the guard; on a rollback, apply it."""
        for name, c in self.counters.by_policy.items():
            metrics.POLICY_REWARD_RATE.labels(name).set(c.reward_rate)
            metrics.POLICY_MEAN_PROPENSITY.labels(name).set(c.mean_propensity)
        if self.config is None or self.rolled_back:
            return None
        decision = check_canary(self.config, self.counters)
        self.last_decision = decision
        if decision is not None and decision.rollback:
            assert self.config.canary is not None
            canary = self.config.canary
            self.config, self.rolled_back = self.config.rolled_back(), True
            self._refresh_weights()
            metrics.CANARY_ROLLBACKS.labels(canary).inc()
            log.warning("canary guard: %s; its users now get %r (set its weight to 0 in %s to make this "
                        "permanent)", decision.reason, self.config.control, self.path)
        return decision

    async def tick(self) -> None:
        """One period: reload the file if it changed, then refresh the metrics and run the guard."""
        await self.poll()
        self.check()

