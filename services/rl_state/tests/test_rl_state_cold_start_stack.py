"""Cold start end to end, on one and on two shards: first-time users on the homepage (US, smart_tv) get the
most popular items that the context's filter allows, across all shards.

The router asks every shard for its k' = 50 most popular allowed items (SEARCH_ORDER_POPULARITY) and merges
them, and rl_state's cold-start policy samples among those: so every item returned must be allowed and among
the 50 most popular allowed items of the whole catalogue, whatever the shard layout. The measurement is
bench/bench_quality.py's (``cold_start_ranks``), which also writes quality.json's ``cold_start``.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
from gmco_stack.stack import Stack, StackConfig

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parents[3]
CANDIDATES = 50  # the router's GMCO_ROUTER_MIN_CANDIDATES default, k' for k = 10


def _bench():
    spec = importlib.util.spec_from_file_location("bench_quality_under_test", REPO / "bench" / "bench_quality.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("shards", [1, 2])
def test_cold_start_returns_the_most_popular_allowed_items(shards: int, tmp_path_factory) -> None:
    config = StackConfig(items=3000, dim=16, shards=shards, routers=1, index_backend="exact",
                         run_dir=tmp_path_factory.mktemp(f"cold{shards}"), base_port=None, start_timeout=240)
    with Stack(config) as stack:
        out = _bench().cold_start_ranks(stack, users=12, k=10, prefix=f"cold-test-{shards}")
    assert out["items_returned"] == 12 * 10 and out["degraded_replies"] == 0
    assert out["policies"] == {"cold_start": 12}
    assert out["not_allowed_items"] == 0
    assert 0 < out["allowed_items"] < out["catalogue_items"]  # the filter does filter
    assert out["max_popularity_rank"] <= CANDIDATES, out
    assert out["median_popularity_rank_fraction"] <= 0.01, out
    assert out["distinct_items"] > 10  # sampled among the popular ones, not one fixed list
