"""Storage faults on real shard replicas: a full snapshot disk, corrupt and truncated snapshots at start,
and poison entries written straight into the catalogue log. In each, the replica keeps (or gets back to)
serving exactly the acknowledged catalogue, and the fault is logged and counted."""

from __future__ import annotations

import errno
import os
import subprocess
import time
from pathlib import Path

import numpy as np
import psycopg
import pytest
from gmco.common.v1 import common_pb2
from gmco.router.v1 import router_service_pb2 as rpb
from gmco.shard.v1 import shard_service_pb2 as spb
from gmco_common.ids import to_int64
from gmco_common.slots import slot_of
from gmco_common.vectors import encode_batch
from gmco_testing.procs import grpc_serving

pytestmark = pytest.mark.e2e

SNAPSHOT_INTERVAL = 5.0  # GMCO_SHARD_SNAPSHOT_INTERVAL_SECONDS in the chaos stack


def _unit(seed: int, n: int, dim: int) -> np.ndarray:
    vecs = np.random.default_rng(seed).standard_normal((n, dim)).astype(np.float32)
    return vecs / np.linalg.norm(vecs, axis=1, keepdims=True)


def _write(chaos, first_id: int, n: int, seed: int) -> tuple[list[int], int]:
    """Upsert ``n`` items through Envoy; their ids and the acknowledged lsn."""
    ids = list(range(first_id, first_id + n))
    resp = chaos.router.UpsertMedia(rpb.UpsertMediaRequest(
        items=[chaos.item(m, v) for m, v in zip(ids, _unit(seed, n, chaos.dim), strict=True)]), timeout=10)
    return ids, resp.lsn


def _holds(chaos, svc, ids: list[int], lsn: int) -> None:
    chaos.wait_caught_up(svc, lsn)
    got = chaos.shard_stub(svc).GetMedia(spb.GetMediaRequest(media_ids=ids), timeout=10)
    owned = {m for m in ids if chaos.shard_of(m) == chaos.shard_id_of(svc)}
    assert owned <= {it.media_id for it in got.items}, f"{svc.name} lost acknowledged items"


def _serves(chaos, svc) -> None:
    assert grpc_serving(svc.target, "gmco.shard.v1.ShardService"), f"{svc.name} is not SERVING"
    query = encode_batch(_unit(99, 1, chaos.dim))
    found = chaos.shard_stub(svc).Search(spb.SearchRequest(queries=query, k=5), timeout=10)
    assert len(found.results[0].items) == 5


def _complete_snapshots(directory: Path) -> list[Path]:
    return sorted(p for p in directory.glob("snap-*") if not p.name.endswith(".tmp") and (p / "meta.json").is_file())


def _wait(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


def _fill(directory: Path) -> Path:
    """Write a file in ``directory`` until its filesystem is full."""
    filler = directory / "filler"
    block = b"\0" * (64 << 10)
    with open(filler, "wb", buffering=0) as fh:  # unbuffered: nothing left to flush at close
        for size in (len(block), 4096, 512):
            try:
                while True:
                    fh.write(block[:size])
            except OSError as exc:
                assert exc.errno == errno.ENOSPC, exc
    return filler


def test_disk_full_for_snapshots(chaos) -> None:
    """A full snapshot filesystem (a small tmpfs mounted over the replica's snapshot directory): the
    replica keeps serving and applying writes, each failed snapshot is logged and counted and leaves
    nothing half-written, and snapshots resume once space returns; a restart then loads one of them.
    (Checked against the shard before the supervisor: the first failure ended periodic snapshots, and
    the half-written .tmp directory stayed, holding the space.)"""
    victim = chaos.replicas_of(1)[1]
    directory = chaos.stack.snapshot_dirs[victim.name]
    existing = _complete_snapshots(directory)
    assert existing, "the chaos stack's replicas snapshot every few seconds"
    size = max(sum(f.stat().st_size for f in snap.rglob("*") if f.is_file()) for snap in existing)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={3 * size + (1 << 20)}", "gmco-chaos-full", str(directory)],
                   check=True)
    try:
        filler = _fill(directory)
        landed = {p.name for p in _complete_snapshots(directory)}  # whole snapshots written before it filled
        failures = chaos.metric(victim, "gmco_background_failures_total", job="snapshot")
        _wait(lambda: chaos.metric(victim, "gmco_background_failures_total", job="snapshot") >= failures + 2,
              4 * SNAPSHOT_INTERVAL, "two failed snapshots")
        ids, lsn = _write(chaos, 7 * 10**9, 200, seed=1)
        _holds(chaos, victim, ids, lsn)
        _serves(chaos, victim)
        left = {p.name for p in directory.iterdir()} - {"filler", "CURRENT"}
        assert left == landed, f"a failed snapshot left files behind: {sorted(left - landed)}"
        assert "snapshot directory" in victim.log_tail(200) and "is full" in victim.log_tail(200)

        filler.unlink()  # space returns
        _wait(lambda: _complete_snapshots(directory), 4 * SNAPSHOT_INTERVAL, "a snapshot after space returned")
        _wait(lambda: not list(directory.glob("*.tmp")), SNAPSHOT_INTERVAL, "the snapshot to finish")
        victim.kill()
        victim.start()
        victim.wait_ready(120)
        assert chaos.metric(victim, "gmco_shard_started_from_info", source="snapshot") == 1
        _holds(chaos, victim, ids, lsn)
    finally:
        if not victim.running():
            victim.start()
            victim.wait_ready(120)
        victim.kill()  # nothing may hold the mount while it goes
        subprocess.run(["umount", "-l", str(directory)], check=False)
        chaos.stack.restart(victim.name)
    chaos.wait_caught_up(victim, chaos.log_head())


def _damage(path: Path, how: str) -> None:
    data = bytearray(path.read_bytes())
    if how == "truncate":
        path.write_bytes(bytes(data[: len(data) // 2]))
    else:  # flip bits in the middle: same size, different content
        for i in range(len(data) // 2, min(len(data), len(data) // 2 + 16)):
            data[i] ^= 0xFF
        path.write_bytes(bytes(data))


@pytest.mark.parametrize("how", ["flip", "truncate"])
def test_corrupt_snapshots_at_start_are_refused(chaos, how) -> None:
    """The newest snapshot damaged: the replica refuses it (checksums) and loads the older one; every
    snapshot damaged: it starts from the catalogue and replays the whole log. Either way it then holds
    every acknowledged write and never served partial data (it is not SERVING until it caught up)."""
    victim = chaos.replicas_of(0)[1]
    directory = chaos.stack.snapshot_dirs[victim.name]
    started = time.time_ns()
    ids, lsn = _write(chaos, 8 * 10**9 + (0 if how == "flip" else 10**6), 300, seed=2)
    chaos.wait_caught_up(victim, lsn)
    # two sound snapshots of this test's own (an earlier test may have left damaged ones behind)
    _wait(lambda: sum(p.stat().st_mtime_ns > started for p in _complete_snapshots(directory)) >= 2,
          4 * SNAPSHOT_INTERVAL, "two snapshots")
    damaged: set[Path] = set()  # damage each snapshot once: flipping the same bits twice would repair it
    for damage_all in (False, True):
        victim.kill()
        snaps = sorted(_complete_snapshots(directory), key=lambda p: p.stat().st_mtime_ns)
        for snap in snaps if damage_all else snaps[-1:]:
            if snap not in damaged:
                _damage(max((f for f in snap.rglob("*.npy")), key=lambda f: f.stat().st_size), how)
                damaged.add(snap)
        victim.start()
        victim.wait_ready(180)
        rejected = chaos.metric(victim, "gmco_shard_snapshots_rejected_total")
        source = "catalogue" if damage_all else "snapshot"
        assert rejected >= (len(snaps) if damage_all else 1)
        assert chaos.metric(victim, "gmco_shard_started_from_info", source=source) == 1, source
        _holds(chaos, victim, ids, lsn)
        assert "snapshot refused" in victim.log_tail(400)
        sibling = chaos.replicas_of(0)[0]
        head = chaos.log_head()
        assert chaos.wait_caught_up(victim, head).item_count == chaos.wait_caught_up(sibling, head).item_count


def _poison(chaos, rows: list[tuple[int, int, bytes | None, bytes | None]]) -> None:
    """Append (op, media_id, vector, attributes) rows straight into the PostgreSQL catalogue log, as an
    older or buggy writer could; nothing of the router's validation runs."""
    with psycopg.connect(chaos.stack.catalog_dsn, autocommit=True) as conn:
        for op, media_id, vector, attrs in rows:
            conn.execute("INSERT INTO catalog_log (slot, op, media_id, vector, attributes) VALUES (%s, %s, %s, %s, %s)",
                         (slot_of(media_id), op, to_int64(media_id), vector, attrs))
        conn.execute("SELECT pg_notify('gmco_catalog_log', '0')")


def test_poison_log_entries_are_skipped_and_counted(chaos) -> None:
    """Entries no replica can apply (a vector of the wrong size, non-finite values, attributes that do
    not decode, an op this version does not know) are skipped with a metric and a log line on every
    replica (the documented policy: gmco_shard.apply), tailing goes on, and a good write after them is
    applied. (Checked before the unknown-op fix: the log reader raised on op 9, the tailer died in a
    restart loop and the replica never applied the good write.)"""
    base = 9 * 10**9
    good_vec = _unit(3, 1, chaos.dim)[0].astype(np.float16).tobytes()
    attrs = common_pb2.MediaAttributes(genre_ids=[1], region_mask=1, format_mask=1).SerializeToString()
    nan = np.full(chaos.dim, np.nan, np.float16).tobytes()
    ids = [base + i for i in range(8)]  # both shards get each kind
    poison = []
    for i, media_id in enumerate(ids):
        kind = i % 4
        poison.append([(1, media_id, good_vec[:-2], attrs), (1, media_id, nan, attrs),
                       (1, media_id, good_vec, b"\xff\xff\xff"), (9, media_id, good_vec, attrs)][kind])
    before = {svc.name: chaos.metric(svc, "gmco_shard_log_entries_skipped_total") for svc in chaos.stack.shard_services}
    _poison(chaos, poison)
    good, lsn = _write(chaos, base + 100, 20, seed=4)
    for svc in chaos.stack.shard_services:
        _holds(chaos, svc, good, lsn)
        _serves(chaos, svc)
        got = chaos.shard_stub(svc).GetMedia(spb.GetMediaRequest(media_ids=ids), timeout=10)
        assert not got.items, f"{svc.name} applied a poison entry"
        skipped = chaos.metric(svc, "gmco_shard_log_entries_skipped_total") - before[svc.name]
        assert skipped == sum(1 for m in ids if chaos.shard_of(m) == chaos.shard_id_of(svc)), svc.name
        assert chaos.metric(svc, "gmco_background_restarts_total", job="log-tailer") == 0, svc.name


def test_the_stack_is_whole_after_the_storage_faults(chaos) -> None:
    head = chaos.log_head()
    for svc in chaos.stack.shard_services:
        assert svc.running(), svc.name
        chaos.wait_caught_up(svc, head)
    assert os.path.ismount("/proc")  # (the tmpfs is gone; /proc is the sanity check that ismount works)
    assert not any(os.path.ismount(d) for d in chaos.stack.snapshot_dirs.values())
