"""A replica killed -9 under load through Envoy: few failed requests, the routers drop it from the
rotation quickly, and after a restart it catches up with the log and serves again."""

from __future__ import annotations

import asyncio
import random
import threading
import time

import grpc
import numpy as np
import pytest
from gmco.router.v1 import router_service_pb2 as rpb
from gmco.router.v1 import router_service_pb2_grpc
from gmco.shard.v1 import shard_service_pb2 as spb
from gmco_common.vectors import encode_batch

pytestmark = pytest.mark.e2e

LOAD_SECONDS = 15.0
CONCURRENCY = 8
MAX_FAILED_FRACTION = 0.001
ROTATION_EXIT_SECONDS = 5.0
REQUEST_TIMEOUT = 5.0  # under Envoy's 10 s route timeout; generous because the test machine is shared


async def _load(chaos, until: float, counts: dict[str, int], failed_at: list[float]) -> None:
    target = chaos.stack.envoy_target
    async with grpc.aio.insecure_channel(target) as channel:
        stub = router_service_pb2_grpc.RecommendationServiceStub(channel)

        async def worker() -> None:
            while time.monotonic() < until:
                user = f"load-{random.randrange(1000)}"
                try:
                    resp = await stub.Recommend(chaos.recommend_request(user), metadata=[("x-user-id", user)],
                                                timeout=REQUEST_TIMEOUT)
                except grpc.aio.AioRpcError as exc:
                    failed_at.append(time.monotonic())
                    counts["failed"] += 1
                    counts[exc.code().name] = counts.get(exc.code().name, 0) + 1
                else:
                    counts["ok"] += 1
                    counts["degraded"] += int(bool(resp.degraded))

        await asyncio.gather(*(worker() for _ in range(CONCURRENCY)))


def _wait_out_of_rotation(chaos, target: str, timeout: float) -> float:
    """Seconds until no router counts ``target`` healthy."""
    start = time.monotonic()
    while 1.0 in chaos.replica_health().get(target, {1.0}):
        assert time.monotonic() - start < timeout, f"{target} still in the routers' rotation"
        time.sleep(0.05)
    return time.monotonic() - start


def test_replica_killed_under_load(chaos) -> None:
    victim = chaos.replicas_of(0)[1]
    assert chaos.in_rotation(victim)
    counts = {"ok": 0, "failed": 0, "degraded": 0}
    failed_at: list[float] = []
    # The load runs on its own event loop in a thread; this thread kills, watches and writes.
    load = threading.Thread(target=asyncio.run, args=(_load(chaos, time.monotonic() + LOAD_SECONDS, counts, failed_at),))
    load.start()
    time.sleep(4)

    killed_at = time.monotonic()
    victim.kill()
    out_after = _wait_out_of_rotation(chaos, victim.target, 30.0)

    # Writes while the replica is down: after its restart it has to replay them from the log.
    rng = np.random.default_rng(5)
    for start in range(0, 500, 100):
        vecs = rng.standard_normal((100, chaos.dim)).astype(np.float32)
        vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
        chaos.router.UpsertMedia(rpb.UpsertMediaRequest(
            items=[chaos.item(2 * 10**9 + start + i, v) for i, v in enumerate(vecs)]), timeout=10)
    load.join()
    total = counts["ok"] + counts["failed"]
    since_kill = [round(t - killed_at, 2) for t in failed_at]
    print(f"\nload: {counts}, failures at {since_kill} s after the kill, "
          f"dead replica out of rotation after {out_after:.2f} s")
    assert total > 100, f"the load loop barely ran: {counts}"
    assert counts["failed"] / total <= MAX_FAILED_FRACTION, (
        f"{counts['failed']} of {total} requests failed ({counts}), at {since_kill} s after the kill")
    assert out_after <= ROTATION_EXIT_SECONDS

    chaos.stack.restart(victim.name)
    head = chaos.log_head()
    assert chaos.wait_caught_up(victim, head).applied_lsn >= head
    deadline = time.monotonic() + 30
    while chaos.replica_health().get(victim.target) != {1.0}:
        assert time.monotonic() < deadline, "the restarted replica did not rejoin every router's rotation"
        time.sleep(0.1)
    query = np.random.default_rng(6).standard_normal((1, chaos.dim)).astype(np.float32)
    found = chaos.shard_stub(victim).Search(spb.SearchRequest(queries=encode_batch(query), k=5, min_lsn=head), timeout=10)
    assert len(found.results[0].items) == 5
