"""make bench-ingest: the durable catalogue log end to end.

1. Upserts/s through the router (the local stack: Envoy -> router -> catalogue log), batches of 500.
2. Replay rate: a fresh replica store catching up from lsn 0 (read by lsn + apply), entries/s.
3. Restart time: a replica loading its snapshot (exact backend), seconds per GB of snapshot: the load
   alone in-process, and a whole shard process from launch to SERVING with that snapshot.
Writes bench/results/bench_ingest.{json,png}.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import grpc
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import plot_path, write_json
from gmco.common.v1 import common_pb2
from gmco.router.v1 import router_service_pb2 as rpb
from gmco.router.v1 import router_service_pb2_grpc
from gmco_catalog.log import open_log
from gmco_common.datagen import generate_catalogue
from gmco_common.vectors import encode_vector
from gmco_shard.apply import apply_entries
from gmco_shard.filters import columns_from_catalogue
from gmco_shard.index.base import IndexParams
from gmco_shard.snapshot import load_snapshot, save_snapshot
from gmco_shard.store import ShardStore
from gmco_stack.stack import Stack, StackConfig
from gmco_testing.procs import free_port, stop_process, wait_grpc_serving

SHARD_SERVICE = "gmco.shard.v1.ShardService"


def ingest(stack: Stack, n: int, dim: int, batch: int) -> dict:
    rng = np.random.default_rng(1)
    attrs = common_pb2.MediaAttributes(genre_ids=[1], region_mask=1, format_mask=1)
    with grpc.insecure_channel(stack.envoy_target) as ch:
        stub = router_service_pb2_grpc.RecommendationServiceStub(ch)
        requests = []
        for start in range(0, n, batch):
            vecs = rng.standard_normal((batch, dim)).astype(np.float16)
            requests.append(rpb.UpsertMediaRequest(items=[
                common_pb2.MediaItem(media_id=10**9 + start + i, vector=encode_vector(v), attributes=attrs)
                for i, v in enumerate(vecs)]))
        t = time.perf_counter()
        last = 0
        for req in requests:
            last = stub.UpsertMedia(req, timeout=60).lsn
        wall = time.perf_counter() - t
    return {"upserts": n, "batch": batch, "seconds": wall, "upserts_per_second": n / wall, "last_lsn": last}


async def replay(dsn: str, dim: int) -> dict:
    store = ShardStore(dim, "exact", IndexParams())
    async with open_log(dsn) as log:
        head = await log.head_lsn()
        applied, entries, t = 0, 0, time.perf_counter()
        while applied < head:
            res = await log.read(applied, None, 5000)
            apply_entries(store, res.entries, res.scanned_lsn)
            entries += len(res.entries)
            applied = res.scanned_lsn
        wall = time.perf_counter() - t
    return {"entries": entries, "seconds": wall, "entries_per_second": entries / wall}


def restart(items: int, dim: int) -> dict:
    cat = generate_catalogue(items, dim, seed=3, progress=True)
    store = ShardStore(dim, "exact", IndexParams())
    store.bulk_load(np.asarray(cat.vectors), columns_from_catalogue(cat))
    with tempfile.TemporaryDirectory() as tmp:
        _, size = save_snapshot(store, Path(tmp))
        del store, cat
        times = []
        for _ in range(3):
            fresh = ShardStore(dim, "exact", IndexParams())
            t = time.perf_counter()
            load_snapshot(fresh, Path(tmp))
            times.append(time.perf_counter() - t)
            del fresh
        serving = [_process_to_serving(Path(tmp), dim) for _ in range(3)]
    median, serving_median = float(np.median(times)), float(np.median(serving))
    return {"items": items, "dim": dim, "snapshot_bytes": size, "load_seconds_median": median,
            "seconds_per_gb": median / (size / 1e9), "process_to_serving_seconds": serving,
            "process_to_serving_seconds_median": serving_median,
            "process_seconds_per_gb": serving_median / (size / 1e9)}


def _process_to_serving(snapshot_dir: Path, dim: int) -> float:
    """Seconds from launching a shard process on ``snapshot_dir`` until its health check says SERVING."""
    port = free_port()
    env = {**os.environ, "GMCO_SHARD_PORT": str(port), "GMCO_SHARD_DIM": str(dim), "GMCO_SHARD_SHARD_ID": "0",
           "GMCO_SHARD_SHARD_COUNT": "1", "GMCO_SHARD_INDEX_BACKEND": "exact",
           "GMCO_SHARD_SNAPSHOT_DIR": str(snapshot_dir), "GMCO_SHARD_SNAPSHOT_INTERVAL_SECONDS": "0",
           "GMCO_SHARD_LOG_LEVEL": "WARNING"}
    t = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "gmco_shard"], env=env)
    try:
        wait_grpc_serving(f"127.0.0.1:{port}", 300, proc, SHARD_SERVICE)
        return time.perf_counter() - t
    finally:
        stop_process(proc)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--upserts", type=int, default=20_000)
    ap.add_argument("--batch", type=int, default=500)
    ap.add_argument("--dim", type=int, default=1024)
    ap.add_argument("--restart-items", type=int, default=1_000_000)
    a = ap.parse_args()
    out: dict = {}
    with tempfile.TemporaryDirectory() as run:
        config = StackConfig(items=2000, dim=a.dim, shards=2, routers=1, index_backend="exact",
                             run_dir=Path(run), base_port=None, start_timeout=300)
        with Stack(config) as stack:
            out["ingest"] = ingest(stack, a.upserts, a.dim, a.batch)
            print("ingest", out["ingest"])
            dsn = stack.catalog_dsn
        out["replay"] = asyncio.run(replay(dsn, a.dim))
        print("replay", out["replay"])
    out["restart"] = restart(a.restart_items, a.dim)
    print("restart", out["restart"])
    print("wrote", write_json("bench_ingest", out))
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.bar(["upserts/s (router->log)", "replay entries/s"],
           [out["ingest"]["upserts_per_second"], out["replay"]["entries_per_second"]])
    ax.axhline(10_000, ls="--", c="grey", label="seed: 10k writes/s")
    ax.axhline(50_000, ls=":", c="grey", label="seed: 50k replay/s")
    ax.set(ylabel="per second", title=f"catalogue log (dim {a.dim})")
    ax.legend()
    fig.tight_layout()
    fig.savefig(plot_path("bench_ingest"))


if __name__ == "__main__":
    main()
