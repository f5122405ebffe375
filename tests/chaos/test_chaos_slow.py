"""Slow dependencies: one shard replica, rl_state or the cache answering late, through a delaying proxy.

A small stack of its own (one router, one shard with two replicas) whose router reaches replica r1,
rl_state and the cache through :class:`gmco_testing.delay.DelayProxy`, so each can be made slow while
the test runs. What the caller must see:

- a replica 200 ms late loses its traffic (the router picks by expected wait, counts a hedge's loser as
  slow, and hedges at the fastest replica's p95), so answers stay fast and few calls need a hedge;
- rl_state or the cache far slower than the caller's deadline: the answer still comes within the
  deadline, degraded and saying which component, instead of DEADLINE_EXCEEDED;
- once the dependency is fast again, answers are whole again.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import grpc
import numpy as np
import pytest
from gmco.common.v1 import common_pb2
from gmco.router.v1 import router_service_pb2 as rpb
from gmco.router.v1 import router_service_pb2_grpc
from gmco_stack.stack import Stack, StackConfig
from gmco_testing.metrics import metric_sum

pytestmark = pytest.mark.e2e

CONTEXT = common_pb2.RequestContext(surface=common_pb2.SURFACE_HOMEPAGE, region="US", device="smart_tv")
SLOW_REPLICA = "shard-0-r1"
REPLICA_DELAY = 0.2
FAR_TOO_SLOW = 3.0
DEADLINE = 1.0


@pytest.fixture(scope="module")
def slow_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    config = StackConfig(items=3000, dim=32, shards=1, replicas=2, routers=1, index_backend="exact",
                         run_dir=tmp_path_factory.mktemp("slow"), base_port=None, start_timeout=180,
                         delayed=(SLOW_REPLICA, "rl_state", "cache"))
    with Stack(config) as running:
        yield running


@pytest.fixture(scope="module")
def router(slow_stack: Stack) -> Iterator[router_service_pb2_grpc.RecommendationServiceStub]:
    with grpc.insecure_channel(slow_stack.envoy_target) as channel:
        yield router_service_pb2_grpc.RecommendationServiceStub(channel)


def _ask(router, user: str, skip_cache: bool = True) -> tuple[rpb.RecommendResponse, float]:
    start = time.perf_counter()
    resp = router.Recommend(rpb.RecommendRequest(user_id=user, k=10, skip_cache=skip_cache, context=CONTEXT),
                            timeout=DEADLINE)
    return resp, time.perf_counter() - start


@pytest.fixture()
def delays(slow_stack: Stack) -> Iterator[dict]:
    yield slow_stack.delays
    for proxy in slow_stack.delays.values():
        proxy.delay = 0.0


def _hedged(stack: Stack) -> float:
    return metric_sum(stack.routers[0].metrics_url, "gmco_router_hedged_calls_total")


def test_a_slow_replica_loses_its_traffic(slow_stack, router, delays) -> None:
    for i in range(60):  # both replicas measured while fast
        _ask(router, f"warm-{i}")
    delays[SLOW_REPLICA].delay = REPLICA_DELAY
    for i in range(40):  # the slow one's latency becomes known
        _ask(router, f"learn-{i}")
    hedged_before = _hedged(slow_stack)
    took = [_ask(router, f"slow-replica-{i}")[1] for i in range(100)]
    hedged = _hedged(slow_stack) - hedged_before
    p50, p90 = np.percentile(took, [50, 90])
    print(f"\nreplica {REPLICA_DELAY * 1000:.0f} ms late: Recommend p50 {p50 * 1000:.1f} ms, p90 {p90 * 1000:.1f} ms; "
          f"{hedged:.0f} of 100 searches hedged")
    # Half the calls on the slow replica without hedging would put the p90 past the delay itself.
    assert p90 < 0.75 * REPLICA_DELAY, f"p90 {p90 * 1000:.0f} ms: traffic still waits on the slow replica"
    # Hedging alone would also keep the p90 low, at the price of a second call for every other search
    # (about 50 of 100); the traffic itself must move: only the exploration calls (1 in 20) go there.
    assert hedged <= 20, f"{hedged:.0f} of 100 searches hedged: the slow replica keeps being picked"


@pytest.mark.parametrize("component", ["rl_state", "cache"])
def test_a_dependency_slower_than_the_deadline_degrades_the_answer_in_time(router, delays, component) -> None:
    user = f"slow-{component}"
    _ask(router, user, skip_cache=False)  # connections up
    delays[component].delay = FAR_TOO_SLOW
    # a user this router has not seen: nothing of theirs is in its own LRUs, so both calls are needed
    resp, took = _ask(router, f"{user}-late", skip_cache=False)
    print(f"\n{component} {FAR_TOO_SLOW:.0f} s late: answered in {took * 1000:.0f} ms, degraded "
          f"{list(resp.degraded_components)}")
    assert took < DEADLINE
    assert resp.items, "a degraded answer still recommends"
    assert resp.degraded and component in resp.degraded_components
    delays[component].delay = 0.0
    deadline = time.monotonic() + 10
    for attempt in range(1000):  # the late answers drain, then the dependency is used again
        resp, _ = _ask(router, f"{user}-after-{attempt}", skip_cache=False)
        if not resp.degraded:
            break
        assert time.monotonic() < deadline, f"still degraded after the delay ended: {resp.degraded_components}"
        time.sleep(0.2)
