"""A replica killed -9 under k6 load through Envoy: few failed requests, the routers drop it from the
rotation quickly, and after a restart it catches up with the log and serves again."""

from __future__ import annotations

import json
import subprocess
import time
from datetime import datetime
from pathlib import Path

import numpy as np
import pytest
from gmco.router.v1 import router_service_pb2 as rpb
from gmco.shard.v1 import shard_service_pb2 as spb
from gmco_common.vectors import encode_batch

pytestmark = pytest.mark.e2e

LOAD_SECONDS = 15
VUS = 8
MAX_FAILED_FRACTION = 0.001
ROTATION_EXIT_SECONDS = 5.0
REQUEST_TIMEOUT = "5s"  # under Envoy's 10 s route timeout; generous because the test machine is shared


def _start_k6(chaos, out: Path) -> subprocess.Popen:
    """k6 in a closed loop of VUS users, every request on the miss path (skip_cache), so each one reaches
    the shards."""
    return chaos.start_k6(chaos.stack.envoy_target, out, VUS=VUS, DURATION=f"{LOAD_SECONDS}s", USERS=1000, SKIP_CACHE=1,
                    TIMEOUT=REQUEST_TIMEOUT)


def _k6_outcomes(out: Path) -> tuple[list[float], dict[str, int]]:
    """Unix times of the requests whose 'recommend OK' check failed, and the count of requests by gRPC status."""
    failed_at: list[float] = []
    statuses: dict[str, int] = {}
    for line in out.read_text().splitlines():
        point = json.loads(line)
        if point.get("type") != "Point":
            continue
        data, tags = point["data"], point["data"].get("tags") or {}
        if point["metric"] == "checks" and tags.get("check") == "recommend OK" and data["value"] == 0:
            failed_at.append(datetime.fromisoformat(data["time"]).timestamp())
        elif point["metric"] == "grpc_req_duration":
            statuses[tags.get("status", "?")] = statuses.get(tags.get("status", "?"), 0) + 1
    return failed_at, statuses


def _wait_out_of_rotation(chaos, target: str, timeout: float) -> float:
    """Seconds until no router counts ``target`` healthy."""
    start = time.monotonic()
    while 1.0 in chaos.replica_health().get(target, {1.0}):
        assert time.monotonic() - start < timeout, f"{target} still in the routers' rotation"
        time.sleep(0.05)
    return time.monotonic() - start


def test_replica_killed_under_load(chaos, tmp_path) -> None:
    victim = chaos.replicas_of(0)[1]
    assert chaos.in_rotation(victim)
    samples = tmp_path / "k6.jsonl"
    k6 = _start_k6(chaos, samples)
    time.sleep(5)  # k6 start-up plus a few seconds of steady load

    killed_at = time.time()
    victim.kill()
    out_after = _wait_out_of_rotation(chaos, victim.target, 30.0)

    # Writes while the replica is down: after its restart it has to replay them from the log.
    rng = np.random.default_rng(5)
    for start in range(0, 500, 100):
        vecs = rng.standard_normal((100, chaos.dim)).astype(np.float32)
        vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
        chaos.router.UpsertMedia(rpb.UpsertMediaRequest(
            items=[chaos.item(2 * 10**9 + start + i, v) for i, v in enumerate(vecs)]), timeout=10)
    output, _ = k6.communicate(timeout=LOAD_SECONDS + 60)
    assert k6.returncode == 0, f"k6 exited {k6.returncode}:\n{output[-3000:]}"
    failed_at, statuses = _k6_outcomes(samples)
    total = sum(statuses.values())
    since_kill = [round(t - killed_at, 2) for t in failed_at]
    print(f"\nk6: {total} requests by status {statuses}, {len(failed_at)} failed, at {since_kill} s after the "
          f"kill; dead replica out of rotation after {out_after:.2f} s")
    assert total > 100, f"the load barely ran: {statuses}\n{output[-3000:]}"
    assert len(failed_at) / total <= MAX_FAILED_FRACTION, (
        f"{len(failed_at)} of {total} requests failed ({statuses}), at {since_kill} s after the kill")
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
