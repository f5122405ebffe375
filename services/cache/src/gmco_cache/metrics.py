"""Prometheus metrics of the cache service (no user ids in labels)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

REQUESTS = Counter(
    "gmco_cache_requests_total",
    "Keys looked up or stored, by keyspace, operation (get|put) and result "
    "(get: hit|miss|bypass; put: stored|bypass). A bypass is a backend that was down, slow or circuit-open.",
    ["keyspace", "op", "result"],
)
BACKEND_SECONDS = Histogram(
    "gmco_cache_backend_seconds",
    "Time of one backend call (a whole batch), by backend and operation, failures included.",
    ["backend", "op"],
    buckets=(0.0001, 0.00025, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0),
)
BACKEND_FAILURES = Counter(
    "gmco_cache_backend_failures_total",
    "Backend calls answered as a bypass, by operation and reason (timeout|error|partial|open).",
    ["op", "reason"],
)
BREAKER_STATE = Gauge("gmco_cache_breaker_state", "Circuit breaker state: 0 closed, 1 half-open, 2 open.")
FILL_LOCKS = Counter(
    "gmco_cache_fill_locks_total",
    "GetRecommendations(lock_on_miss) outcomes on a miss: acquired (this caller fills), filled (another "
    "caller's fill arrived while waiting), busy (still being filled when the wait ended), bypass.",
    ["result"],
)
