"""make bench-ingest: the durable catalogue log end to end.

1. Upserts/s through the router (the local stack: Envoy -> router -> catalogue log), batches of 500.
2. Replay rate: a fresh replica store catching up from lsn 0 (read by lsn + apply), entries/s.
3. Restart time: a replica loading its snapshot, seconds per GB of snapshot: the load alone
   in-process, and a whole shard process from launch to SERVING with that snapshot. Exact backend at
   --restart-items (1M x 1024), HNSW (service defaults M 32, efConstruction 200) at --hnsw-restart-items,
   the largest size whose build fits in 15 minutes on the 2-core machine.
Writes bench/results/bench_ingest.{json,png}.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from pathlib import Path

import grpc
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import plot_path, serve_snapshot, write_json
from gmco.common.v1 import common_pb2
from gmco.router.v1 import router_service_pb2 as rpb
from gmco.router.v1 import router_service_pb2_grpc
from gmco_catalog import open_log
from gmco_common.datagen import generate_catalogue
from gmco_common.vectors import encode_vector
from gmco_shard.apply import apply_entries
from gmco_shard.columns import columns_from_catalogue
from gmco_shard.config import Settings
from gmco_shard.index.params import IndexParams
from gmco_shard.snapshot import load_snapshot, save_snapshot
from gmco_shard.store import ShardStore
from gmco_stack.stack import Stack, StackConfig
from gmco_testing.procs import stop_process


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


def restart(items: int, dim: int, backend: str) -> dict:
    cat = generate_catalogue(items, dim, seed=3, progress=True)
    params = Settings().index_params()  # what a shard process started with defaults uses
    store = ShardStore(dim, backend, params)
    t = time.perf_counter()
    store.bulk_load(np.asarray(cat.vectors), columns_from_catalogue(cat), progress=True)
    build = time.perf_counter() - t
    with tempfile.TemporaryDirectory() as tmp:
        _, size = save_snapshot(store, Path(tmp))
        del store, cat
        times = []
        for _ in range(3):
            fresh = ShardStore(dim, backend, params)
            t = time.perf_counter()
            load_snapshot(fresh, Path(tmp))
            times.append(time.perf_counter() - t)
            del fresh
        serving = [_process_to_serving(Path(tmp), dim, backend) for _ in range(3)]
    median, serving_median = float(np.median(times)), float(np.median(serving))
    return {"backend": backend, "items": items, "dim": dim, "build_seconds": build, "snapshot_bytes": size, "load_seconds_median": median,
            "seconds_per_gb": median / (size / 1e9), "process_to_serving_seconds": serving,
            "process_to_serving_seconds_median": serving_median,
            "process_seconds_per_gb": serving_median / (size / 1e9)}


def _process_to_serving(snapshot_dir: Path, dim: int, backend: str) -> float:
    """Seconds from launching a shard process on ``snapshot_dir`` until its health check says SERVING."""
    proc, _, seconds = serve_snapshot(snapshot_dir, {"GMCO_SHARD_INDEX_BACKEND": backend}, dim)
    stop_process(proc)
    return seconds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--upserts", type=int, default=20_000)
    ap.add_argument("--batch", type=int, default=500)
    ap.add_argument("--dim", type=int, default=1024)
    ap.add_argument("--restart-items", type=int, default=1_000_000, help="exact-backend snapshot size")
    ap.add_argument("--hnsw-restart-items", type=int, default=500_000,
                    help="HNSW snapshot size (0 = skip); 500k builds in about 12 min on 2 cores")
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
    out["restart"] = restart(a.restart_items, a.dim, "exact")
    print("restart", out["restart"])
    if a.hnsw_restart_items:
        out["restart_hnsw"] = restart(a.hnsw_restart_items, a.dim, "hnsw")
        print("restart_hnsw", out["restart_hnsw"])
    print("wrote", write_json("bench_ingest", out))
    import matplotlib.pyplot as plt

    fig, (ax, rx) = plt.subplots(1, 2, figsize=(11, 3.5))
    ax.bar(["upserts/s (router->log)", "replay entries/s"],
           [out["ingest"]["upserts_per_second"], out["replay"]["entries_per_second"]])
    ax.axhline(10_000, ls="--", c="grey", label="seed: 10k writes/s")
    ax.axhline(50_000, ls=":", c="grey", label="seed: 50k replay/s")
    ax.set(ylabel="per second", title=f"catalogue log (dim {a.dim})")
    ax.legend()
    runs = [out[key] for key in ("restart", "restart_hnsw") if key in out]
    labels = [f"{r['backend']} {r['items'] // 1000}k" for r in runs]
    x = np.arange(len(runs))
    rx.bar(x - 0.2, [r["seconds_per_gb"] for r in runs], 0.4, label="snapshot load")
    rx.bar(x + 0.2, [r["process_seconds_per_gb"] for r in runs], 0.4, label="process launch to SERVING")
    rx.set_xticks(x, labels)
    rx.set(ylabel="seconds per GB of snapshot", title="replica restart")
    rx.legend()
    fig.tight_layout()
    fig.savefig(plot_path("bench_ingest"))


if __name__ == "__main__":
    main()
