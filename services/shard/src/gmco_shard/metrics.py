"""Shard metrics (Prometheus). Units in every name."""

from prometheus_client import Gauge, Histogram

SEARCH_SECONDS = Histogram(
    "gmco_shard_search_seconds", "Shard search time per request (all queries of the batch).", ["mode"],
    buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0),
)
ITEMS = Gauge("gmco_shard_items", "Live items held by this shard.")
INDEX_BYTES = Gauge("gmco_shard_index_bytes", "Size of the sealed ANN index in bytes.")
VECTOR_BYTES = Gauge("gmco_shard_vector_bytes", "Size of the stored FP16 vectors in bytes.")
APPLIED_LSN = Gauge("gmco_shard_applied_lsn", "Catalogue log position applied by this replica.")
LAG_ENTRIES = Gauge("gmco_shard_replica_lag_entries", "Catalogue log entries not yet applied.")
LAG_SECONDS = Gauge("gmco_shard_replica_lag_seconds", "Seconds since this replica was last caught up.")
