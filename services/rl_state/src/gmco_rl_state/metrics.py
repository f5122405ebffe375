"""Prometheus metrics of the rl_state service (no user ids in labels)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

EVENTS_APPLIED = Counter(
    "gmco_rl_state_feedback_events_applied_total", "Feedback events applied to user state (first delivery)."
)
DUPLICATES_IGNORED = Counter(
    "gmco_rl_state_feedback_duplicates_ignored_total",
    "Feedback events ignored because their event_id had been applied already.",
)
RANK_SECONDS = Histogram(
    "gmco_rl_state_rank_seconds",
    "Time to answer Rank, by the policy that answered.",
    ["policy"],
    buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0),
)
RANK_BATCH_ENTRIES = Histogram(
    "gmco_rl_state_rank_batch_entries", "Users ranked by one RankBatch call.", buckets=(1, 2, 4, 8, 16, 32, 64),
)
RANK_DEGRADED = Counter(
    "gmco_rl_state_rank_degraded_total", "Rank answers given by the cold-start policy because the state was unreadable."
)

# --- policy experiments (gmco_rl_state.rollout); the label is a policy name from the config, never a user --
POLICY_IMPRESSIONS = Counter("gmco_rl_state_policy_impressions_total",
                             "Items shown (returned by Rank), by the policy that ranked them.", ["policy"])
POLICY_PROPENSITY_SUM = Counter("gmco_rl_state_policy_propensity_sum_total",
                                "Sum of the logged propensities of the items shown, by policy "
                                "(divide by impressions for the mean).", ["policy"])
POLICY_FEEDBACK = Counter("gmco_rl_state_policy_feedback_events_total",
                          "Feedback events applied, by the policy that showed the item.", ["policy"])
POLICY_REWARD_SUM = Gauge("gmco_rl_state_policy_reward_sum",
                          "Sum of the rewards (in [-1, 1], so it can fall) of applied feedback events, by policy.",
                          ["policy"])
POLICY_REWARD_RATE = Gauge("gmco_rl_state_policy_reward_rate_ratio",
                           "Reward per impression since this process started (or the experiment changed), by "
                           "policy; what the canary guard compares.", ["policy"])
POLICY_MEAN_PROPENSITY = Gauge("gmco_rl_state_policy_mean_propensity_ratio",
                               "Mean logged propensity of the items shown, by policy.", ["policy"])
EXPERIMENT_WEIGHT = Gauge("gmco_rl_state_experiment_weight_ratio",
                          "Share of users assigned to each arm now (after any rollback).", ["policy"])
EXPERIMENT_RELOADS = Counter("gmco_rl_state_experiment_reloads_total",
                             "Changes of the experiments file: applied, or invalid (the old one kept).", ["outcome"])
CANARY_ROLLBACKS = Counter("gmco_rl_state_canary_rollbacks_total",
                           "Canaries rolled back by the guard (their weight given to the control).", ["canary"])
