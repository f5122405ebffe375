"""Ingest through the router while things die: a replica killed -9 mid-ingest ends up holding exactly
the acknowledged writes; PostgreSQL (the log) killed and restarted mid-ingest makes writes fail
UNAVAILABLE while it is down, loses no acknowledged write, and ingest resumes."""

from __future__ import annotations

import threading
import time

import grpc
import numpy as np
import pytest
from gmco.router.v1 import router_service_pb2 as rpb
from gmco.shard.v1 import shard_service_pb2 as spb
from gmco_common.slots import SlotMap

pytestmark = pytest.mark.e2e

# The issue asks for 100,000 upserts; 32-dim items keep that inside the directory's time budget.
INGEST_ITEMS = 100_000
BATCH = 500


def _vectors(seed: int, n: int, dim: int) -> np.ndarray:
    """Unit-length FP16 vectors, like the catalogue's (so recommendations after this stay sensible)."""
    vecs = np.random.default_rng(seed).standard_normal((n, dim)).astype(np.float32)
    return (vecs / np.linalg.norm(vecs, axis=1, keepdims=True)).astype(np.float16)


def _assert_holds_exactly(chaos, svc, expected: dict[int, np.ndarray], before: int, lsn: int) -> None:
    """``svc`` has applied ``lsn``, holds every expected id with its exact vector, and nothing else new."""
    stats = chaos.wait_caught_up(svc, lsn)
    assert stats.item_count == before + len(expected), (
        f"{svc.name} holds {stats.item_count} items, expected {before} + {len(expected)} acknowledged")
    stub = chaos.shard_stub(svc)
    ids = sorted(expected)
    for start in range(0, len(ids), 5000):
        got = stub.GetMedia(spb.GetMediaRequest(media_ids=ids[start:start + 5000], include_vectors=True), timeout=30)
        assert not got.missing_media_ids, f"{svc.name} lost {len(got.missing_media_ids)} acknowledged items"
        for it in got.items:
            assert np.array_equal(np.frombuffer(it.vector.data, np.float16), expected[it.media_id]), it.media_id


def test_replica_killed_during_ingest(chaos) -> None:
    shard = 1
    victim, sibling = chaos.replicas_of(shard)[1], chaos.replicas_of(shard)[0]
    before = chaos.wait_caught_up(victim, chaos.log_head()).item_count
    ids = np.arange(INGEST_ITEMS, dtype=np.uint64) + 3 * 10**9
    vecs = _vectors(11, INGEST_ITEMS, chaos.dim)
    acked: dict[int, np.ndarray] = {}
    last = 0
    for start in range(0, INGEST_ITEMS, BATCH):
        batch_ids = [int(m) for m in ids[start:start + BATCH]]
        resp = chaos.router.UpsertMedia(rpb.UpsertMediaRequest(
            items=[chaos.item(m, v) for m, v in zip(batch_ids, vecs[start:start + BATCH], strict=True)],
            request_id=f"ingest-{start}"), timeout=30)
        last = max(last, resp.lsn)
        acked.update(zip(batch_ids, vecs[start:start + BATCH], strict=True))
        if start == INGEST_ITEMS // 3 // BATCH * BATCH:
            victim.kill()  # SIGKILL while ingest goes on; the log keeps taking writes
    assert not victim.running()
    chaos.stack.restart(victim.name)
    slots = SlotMap.even(chaos.stack.config.shards)
    mine = {m: v for m, v in acked.items() if slots.shard_of(m) == shard}
    _assert_holds_exactly(chaos, victim, mine, before, last)
    _assert_holds_exactly(chaos, sibling, mine, before, last)


def test_postgres_restarted_during_ingest(chaos, postgres) -> None:
    batches = 60
    vecs = _vectors(12, batches * 50, chaos.dim)
    base = 4 * 10**9
    acked: dict[int, np.ndarray] = {}
    lsns: list[int] = []
    failures: list[str] = []
    down = threading.Event()
    failed_while_down = threading.Event()
    done = threading.Event()

    def ingest() -> None:
        for b in range(batches):
            ids = range(base + b * 50, base + (b + 1) * 50)
            request = rpb.UpsertMediaRequest(items=[chaos.item(m, vecs[m - base]) for m in ids],
                                             request_id=f"pg-restart-{b}")
            while True:  # retry the same request id until it is acknowledged (idempotent)
                try:
                    lsns.append(chaos.router.UpsertMedia(request, timeout=15).lsn)
                    break
                except grpc.RpcError as exc:
                    failures.append(exc.code().name)
                    if down.is_set():
                        failed_while_down.set()
                    time.sleep(0.2)
            acked.update((m, vecs[m - base]) for m in ids)
            time.sleep(0.05)
        done.set()

    writer = threading.Thread(target=ingest)
    writer.start()
    try:
        while len(lsns) < 10:
            time.sleep(0.05)
        postgres.kill9()
        down.set()
        acked_at_kill = len(lsns)
        assert failed_while_down.wait(30), "no write failed while PostgreSQL was down"
        time.sleep(1.0)
        assert len(lsns) <= acked_at_kill + 1, "writes were acknowledged while PostgreSQL was down"
        down.clear()
        postgres.start()
    finally:
        writer.join(180)
    assert done.is_set(), "ingest did not resume after PostgreSQL came back"
    assert failures and set(failures) == {"UNAVAILABLE"}, failures
    assert lsns == sorted(lsns)
    slots = SlotMap.even(chaos.stack.config.shards)
    for shard in range(chaos.stack.config.shards):
        mine = {m: v for m, v in acked.items() if slots.shard_of(m) == shard}
        for svc in chaos.replicas_of(shard):
            stub = chaos.shard_stub(svc)
            chaos.wait_caught_up(svc, lsns[-1])
            got = stub.GetMedia(spb.GetMediaRequest(media_ids=sorted(mine), include_vectors=True), timeout=30)
            assert not got.missing_media_ids, f"{svc.name} misses acknowledged writes {got.missing_media_ids[:5]}"
            for it in got.items:
                assert np.array_equal(np.frombuffer(it.vector.data, np.float16), mine[it.media_id])
