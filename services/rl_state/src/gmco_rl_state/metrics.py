"""Prometheus metrics of the rl_state service (no user ids in labels)."""

from __future__ import annotations

from prometheus_client import Counter, Histogram

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
RANK_DEGRADED = Counter(
    "gmco_rl_state_rank_degraded_total", "Rank answers given by the cold-start policy because the state was unreadable."
)
