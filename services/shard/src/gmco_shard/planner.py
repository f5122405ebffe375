"""Which path a filtered search takes on one segment, decided per search from measured costs.

Paths:

- ``exact``: scan the allowed rows with the C kernel. Cost grows with the allowed rows (a row is 2 KB at
  1024-d), and it is exact. Chosen when few rows are allowed: at most ``exact_max_rows``, or always on a
  segment without an ANN index (growing, frozen, or the exact backend).
- ``acorn``: the kernels' ACORN-1-style search over the segment's HNSW graph: only allowed rows are scored,
  a disallowed neighbour is crossed through its own neighbours. Its cost stays near an unfiltered search
  while the allowed fraction is small, where faiss's pre-filter either scans far (and slows) or loses
  recall. Chosen below ``acorn_max_fraction`` allowed.
- ``prefilter``: faiss's own HNSW search with the bitmap as an ``IDSelectorBitmap``, its beam widened by
  1 / allowed fraction (at most 4x). Chosen when most rows are allowed.
- ``index``: nothing filtered out: the plain ANN search.
- ``native``: the backend evaluates the ``Filter`` itself (Milvus).
- ``popularity``: a cold-start search ranks what passes the filter by popularity, not by a vector.

The two thresholds default to the crossovers ``make bench-shard-scale`` measured on a 1M x 1024 shard
(docs/benchmarks.md, "Shard at scale"); ``GMCO_SHARD_EXACT_MAX_ROWS`` and ``GMCO_SHARD_ACORN_MAX_FRACTION``
override them. Every search counts its path in ``gmco_shard_search_path_total{path}`` and GetStats. A query
an ANN path answers with fewer than min(k, allowed rows) hits is answered again by the exact scan (counted
in ``gmco_shard_short_answers_filled_total{path}``): a result is short only when the filter allows fewer
than k rows.
"""

from __future__ import annotations

import threading
from collections import Counter
from dataclasses import dataclass

from prometheus_client import Counter as PromCounter

EXACT = "exact"
ACORN = "acorn"
PREFILTER = "prefilter"
INDEX = "index"
NATIVE = "native"
POPULARITY = "popularity"
PATHS = (EXACT, ACORN, PREFILTER, INDEX, NATIVE, POPULARITY)

SEARCH_PATHS = PromCounter("gmco_shard_search_path_total",
                           "Segment searches by the path the planner chose (per segment, per request).", ["path"])
SHORT_ANSWERS = PromCounter("gmco_shard_short_answers_filled_total",
                            "Query rows an ANN path answered with fewer than min(k, allowed rows) hits, "
                            "re-answered by the exact scan of the allowed rows.", ["path"])

# Measured by bench/bench_shard_scale.py on 1M x 1024 FP16 (2 cores): see docs/benchmarks.md. Exact search
# over random allowed rows stops beating the IVF index's filtered search at about 1,000 rows ("crossover").
EXACT_MAX_ROWS = 1000
ACORN_MAX_FRACTION = 0.5
PREFILTER_MAX_WIDEN = 4.0


@dataclass(frozen=True)
class PlannerCosts:
    exact_max_rows: int = EXACT_MAX_ROWS
    acorn_max_fraction: float = ACORN_MAX_FRACTION
    prefilter_max_widen: float = PREFILTER_MAX_WIDEN


class Planner:
    def __init__(self, costs: PlannerCosts | None = None) -> None:
        self.costs = costs or PlannerCosts()
        self._counts: Counter[str] = Counter()
        self._lock = threading.Lock()

    def choose(self, rows: int, allowed: int, has_index: bool, has_graph: bool, filtering: bool = False) -> str:
        """The path for a segment of ``rows`` rows of which ``allowed`` pass the filter and tombstones."""
        c = self.costs
        if not has_index:
            return EXACT
        if allowed >= rows:
            return INDEX
        if filtering:
            return NATIVE
        if allowed <= c.exact_max_rows:
            return EXACT
        if has_graph and allowed < c.acorn_max_fraction * rows:
            return ACORN
        return PREFILTER

    def widen(self, ef: int, rows: int, allowed: int) -> int:
        """The beam of a pre-filtered search: ``ef`` / allowed fraction, capped."""
        if allowed <= 0 or allowed >= rows:
            return ef
        return int(ef * min(rows / allowed, self.costs.prefilter_max_widen))

    def count(self, path: str) -> None:
        SEARCH_PATHS.labels(path).inc()
        with self._lock:
            self._counts[path] += 1

    @property
    def counts(self) -> dict[str, int]:
        with self._lock:
            return dict(self._counts)
