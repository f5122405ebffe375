"""A soak: mixed traffic for SOAK_MINUTES (default 10) on the chaos stack, one replica restart halfway.

Opt-in (``make soak`` sets GMCO_SOAK=1; it is too long for ``make test``). Traffic: k6's ``mixed``
scenario (Recommend, RecordFeedback, RecommendBatch) at a fixed rate through Envoy, and beside it a
writer that upserts a batch of new items every half second and deletes some of the acknowledged ones
every two seconds. Halfway, one shard replica is killed with SIGKILL and started again.

Before the baseline is taken, the processes' bounded in-process stores are filled to their bounds, so
that the RSS check measures growth beyond them and not a cache filling (docs/reliability.md, "Soak
memory"). At the soak's 30 requests/s they fill far slower than the soak lasts: each router's list LRU
(``GMCO_ROUTER_LIST_CACHE_ENTRIES``, 20,000 lists of k=10, about 5.7 KB of RSS each) gains about 9 lists
a second, rl_state's memo of which policy showed which item to whom (``Rollout``, 200,000 (user, item)
pairs) about 140 pairs a second. The pre-warm sends every router, directly, RecommendBatch calls of
first-time users with the soak's k and contexts until it has stored more lists than its LRU holds; their
Rank calls put ten pairs each into rl_state's memo, twice its bound in all. The cache service, which
those lists fill too (a store bounded at 1M entries / 512 MB, far beyond any soak), is restarted
afterwards so that it holds only the soak's own working set. Then a minute of the soak's traffic, and
the baseline: each process's lowest RSS in the soak's first minute (a transient high at the end of the
warm-up would otherwise hide growth).

What must hold, and what is written to bench/results/soak.json:
- no failed request outside the restart window (from the kill until the replica is back in every
  router's rotation plus RESTART_GRACE_S);
- no failed write at all, and every replica holds exactly the acknowledged set at the end (every
  upserted item that was not deleted, none of the deleted ones);
- no process's RSS grows by more than 10 % over its baseline.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import numpy as np
import pytest
from gmco.common.v1 import common_pb2
from gmco.router.v1 import router_service_pb2 as rpb
from gmco.router.v1 import router_service_pb2_grpc
from gmco.shard.v1 import shard_service_pb2 as spb
from gmco_rl_state.rollout import Rollout
from gmco_router.config import Settings as RouterSettings

pytestmark = [pytest.mark.e2e, pytest.mark.skipif(os.environ.get("GMCO_SOAK") != "1",
                                                  reason="the soak runs with `make soak` (GMCO_SOAK=1)")]

ROOT = Path(__file__).resolve().parents[2]
MINUTES = float(os.environ.get("SOAK_MINUTES", "10"))
WARMUP_S = 60.0
RATE = int(os.environ.get("SOAK_RATE", "30"))
RESTART_GRACE_S = 5.0
RSS_GROWTH_MAX = 0.10
BASELINE_S = 60.0  # the baseline is each process's lowest RSS in this first part of the soak
FIRST_ID = 9 * 10**9
K = 10  # the k6 script's default k, and its contexts: what the pre-warm's lists must look like
SURFACES = (common_pb2.SURFACE_HOMEPAGE, common_pb2.SURFACE_VIDEO_PAGE, common_pb2.SURFACE_SEARCH_RESULTS)


def _default(cls: type, name: str) -> int:
    return next(f.default for f in dataclasses.fields(cls) if f.name == name)


LIST_ENTRIES = int(os.environ.get("GMCO_ROUTER_LIST_CACHE_ENTRIES", _default(RouterSettings, "list_cache_entries")))
BATCH = _default(RouterSettings, "max_batch")
SHOWN_ENTRIES = inspect.signature(Rollout).parameters["memo_size"].default


def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError(f"no VmRSS for {pid}")


def prewarm(stack, lists_per_router: int) -> dict[str, int]:
    """Fill every router's list LRU: RecommendBatch calls of first-time users, straight to each router (one
    call at a time, so the admission limit lets each in), until it has stored ``lists_per_router`` lists
    (every answer not degraded is one new key: a new user). Returns the lists stored per router."""

    def fill(router) -> int:
        stored = sent = 0
        with grpc.insecure_channel(router.target) as channel:
            stub = router_service_pb2_grpc.RecommendationServiceStub(channel)
            while stored < lists_per_router:
                assert sent < 2 * lists_per_router, f"{router.name}: only {stored} of {sent} pre-warm answers whole"
                requests = [rpb.RecommendRequest(
                    user_id=f"prewarm-{router.name}-{sent + i}", k=K,
                    context=common_pb2.RequestContext(surface=SURFACES[(sent + i) % 3], region="US",
                                                      device="smart_tv"))
                    for i in range(BATCH)]
                resp = stub.RecommendBatch(rpb.RecommendBatchRequest(requests=requests), timeout=60)
                stored += sum(not r.degraded for r in resp.responses)
                sent += BATCH
        return stored

    with ThreadPoolExecutor(len(stack.routers)) as pool:
        return dict(zip((r.name for r in stack.routers), pool.map(fill, stack.routers), strict=True))


class Writer(threading.Thread):
    """Upserts and deletes through Envoy; keeps the acknowledged state and every failure."""

    def __init__(self, chaos, stop: threading.Event) -> None:
        super().__init__(daemon=True)
        self.chaos, self.stop_event = chaos, stop
        self.live: set[int] = set()
        self.deleted: set[int] = set()
        self.failures: list[tuple[float, str]] = []
        self.lsn = 0
        self.writes = 0

    def run(self) -> None:
        rng = np.random.default_rng(5)
        next_id, tick = FIRST_ID, 0
        while not self.stop_event.wait(0.5):
            tick += 1
            try:
                if tick % 4 == 0 and len(self.live) > 50:
                    doomed = [int(m) for m in rng.choice(sorted(self.live), 5, replace=False)]
                    resp = self.chaos.router.DeleteMedia(rpb.DeleteMediaRequest(media_ids=doomed), timeout=10)
                    self.live -= set(doomed)
                    self.deleted |= set(doomed)
                else:
                    vecs = rng.standard_normal((20, self.chaos.dim)).astype(np.float32)
                    ids = list(range(next_id, next_id + 20))
                    next_id += 20
                    resp = self.chaos.router.UpsertMedia(rpb.UpsertMediaRequest(
                        items=[self.chaos.item(m, v) for m, v in zip(ids, vecs, strict=True)]), timeout=10)
                    self.live |= set(ids)
                self.lsn = max(self.lsn, resp.lsn)
                self.writes += 1
            except Exception as exc:  # noqa: BLE001 - every failure is recorded and judged at the end
                self.failures.append((time.time(), repr(exc)[:200]))


@pytest.mark.timeout(int(MINUTES * 60 + WARMUP_S + 900))
def test_soak(chaos, tmp_path) -> None:
    stack = chaos.stack
    target = stack.envoy_target
    prewarm_start = time.monotonic()
    prewarmed = prewarm(stack, LIST_ENTRIES + BATCH)
    shown = sum(prewarmed.values()) * K
    assert shown >= SHOWN_ENTRIES, f"the pre-warm showed {shown} (user, item) pairs, under rl_state's {SHOWN_ENTRIES}"
    prewarm_s = time.monotonic() - prewarm_start
    stack.restart("cache")
    pids = {name: svc.pid for name, svc in stack.services.items() if svc.pid is not None}
    warm = chaos.run_k6(target, tmp_path / "warmup.jsonl", timeout=WARMUP_S + 120, SCENARIO="mixed", RATE=RATE,
                        VUS=40, DURATION=f"{WARMUP_S:g}s", USERS=5000)
    assert warm, "the warm-up sent nothing"
    baseline = {n: _rss_mb(p) for n, p in pids.items()}
    peak = dict(baseline)
    series: list[dict[str, float]] = []  # every 30 s: a growth that levels off is a cache filling, not a leak

    stop = threading.Event()
    writer = Writer(chaos, stop)
    duration = MINUTES * 60
    k6 = chaos.start_k6(target, tmp_path / "soak.jsonl", SCENARIO="mixed", RATE=RATE, VUS=40,
                        DURATION=f"{duration:g}s", USERS=5000)
    writer.start()
    started = time.time()
    victim = chaos.replicas_of(0)[1]
    window: tuple[float, float] | None = None
    while k6.poll() is None:
        time.sleep(5)
        now = {name: _rss_mb(pid) for name, pid in pids.items()}
        for name, mb in now.items():
            if name != victim.name or window is not None:
                peak[name] = max(peak[name], mb)
            if time.time() - started <= BASELINE_S:
                baseline[name] = min(baseline[name], mb)
        if not series or time.time() - started >= 30 * len(series):
            series.append({"t": round(time.time() - started), **{n: round(v, 1) for n, v in now.items()}})
        if window is None and time.time() - started >= duration / 2:
            killed = time.time()
            victim.kill()
            victim.start()
            victim.wait_ready(180)
            deadline = time.monotonic() + 60
            while not chaos.in_rotation(victim) and time.monotonic() < deadline:
                time.sleep(0.2)
            window = (killed, time.time() + RESTART_GRACE_S)
            pids[victim.name] = victim.pid
            baseline[victim.name] = peak[victim.name] = _rss_mb(victim.pid)  # a new process: its own baseline
    stop.set()
    writer.join(30)
    output = k6.stdout.read() if k6.stdout else ""
    assert k6.returncode == 0, f"k6 exited {k6.returncode}:\n{output[-3000:]}"
    assert window is not None, "the soak ended before the restart"

    samples = chaos.k6_samples(tmp_path / "soak.jsonl")
    failed = [s for s in samples if s.status != "0"]
    outside = [s for s in failed if not window[0] <= s.at <= window[1]]

    head = chaos.log_head()
    missing: dict[str, int] = {}
    resurrected: dict[str, int] = {}
    for svc in stack.shard_services:
        chaos.wait_caught_up(svc, max(head, writer.lsn), timeout=120)
        sid = chaos.shard_id_of(svc)
        mine = sorted(m for m in writer.live if chaos.shard_of(m) == sid)
        gone = sorted(m for m in writer.deleted if chaos.shard_of(m) == sid)
        stub = chaos.shard_stub(svc)
        held = {it.media_id for i in range(0, len(mine), 1000)
                for it in stub.GetMedia(spb.GetMediaRequest(media_ids=mine[i:i + 1000]), timeout=30).items}
        back = {it.media_id for i in range(0, len(gone), 1000)
                for it in stub.GetMedia(spb.GetMediaRequest(media_ids=gone[i:i + 1000]), timeout=30).items}
        missing[svc.name] = len(set(mine) - held)
        resurrected[svc.name] = len(back)

    growth = {n: (peak[n] - baseline[n]) / baseline[n] for n in baseline}
    result = {
        "minutes": MINUTES, "rate_per_second": RATE,
        "prewarm": {"lists_per_router": prewarmed, "list_cache_entries": LIST_ENTRIES,
                    "shown_pairs": shown, "shown_memo_entries": SHOWN_ENTRIES, "seconds": round(prewarm_s, 1)},
        "warmup_seconds": WARMUP_S, "baseline_seconds": BASELINE_S,
        "requests": len(samples), "failed": len(failed),
        "failed_outside_restart_window": len(outside),
        "restart_window_seconds": round(window[1] - window[0], 1),
        "writes_acknowledged": writer.writes, "write_failures": len(writer.failures),
        "items_live": len(writer.live), "items_deleted": len(writer.deleted),
        "acknowledged_items_missing": missing, "deleted_items_present": resurrected,
        "rss_baseline_mb": {n: round(v, 1) for n, v in baseline.items()},
        "rss_peak_mb": {n: round(v, 1) for n, v in peak.items()},
        "rss_growth_fraction": {n: round(g, 3) for n, g in growth.items()},
        "rss_series_mb": series,
        "command": "make soak",
    }
    out = ROOT / "bench" / "results" / "soak.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))

    assert not writer.failures, f"writes failed: {writer.failures[:5]}"
    assert not outside, f"{len(outside)} requests failed outside the restart window: {outside[:5]}"
    assert not any(missing.values()), f"acknowledged items missing: {missing}"
    assert not any(resurrected.values()), f"deleted items present: {resurrected}"
    assert max(growth.values()) <= RSS_GROWTH_MAX, f"RSS grew: {growth}"
