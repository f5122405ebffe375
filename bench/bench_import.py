"""make bench-import: ``gmco import`` of a Parquet file into the catalogue log of a running local stack.

Starts the local stack (2 shards tailing the SQLite catalogue log, 1 router, Envoy) on a small demo
catalogue, writes a Parquet file of --items x --dim FP16 vectors with every attribute, then runs the
``gmco import`` command (a subprocess, as an operator would) with ``--wait-for`` every shard replica, and
reads its timings:

- append rate: items/s from the first row read to the last batch committed in the log;
- caught-up rate: items / (import + time until every replica has applied the last lsn).

While it runs, the log's head and every replica's ``applied_lsn`` are sampled (GetStats) every 0.2 s: the
timeline shows whether the shards keep up. Afterwards the first and last imported items are read back from the
shards (GetMedia) and a Recommend with min_lsn = the last lsn answers, which is read-your-writes over imported
rows. Writes bench/results/bench_import.json and bench/results/bench_import.png.
"""

from __future__ import annotations

import argparse
import os
import re
import resource
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Self

import grpc
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import plot_path, write_json
from gmco.router.v1 import router_service_pb2 as rpb
from gmco.router.v1 import router_service_pb2_grpc
from gmco.shard.v1 import shard_service_pb2, shard_service_pb2_grpc
from gmco_stack.stack import Stack, StackConfig


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds a process has used (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class Timeline:
    """Samples (seconds since start, log head, each replica's applied_lsn) from a thread until stopped."""

    def __init__(self, catalog: str, shards: list[str], every: float = 0.2) -> None:
        self.samples: list[list[float]] = []
        self._catalog, self._shards, self._every = catalog, shards, every
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self.started = time.perf_counter()

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        channels = [grpc.insecure_channel(t) for t in self._shards]
        stubs = [shard_service_pb2_grpc.ShardServiceStub(c) for c in channels]
        log = sqlite3.connect(f"file:{self._catalog}?mode=ro", uri=True)
        try:
            while not self._stop.is_set():
                head = log.execute("SELECT coalesce(max(lsn), 0) FROM catalog_log").fetchone()[0]
                try:
                    applied = [s.GetStats(shard_service_pb2.GetStatsRequest(), timeout=10).applied_lsn for s in stubs]
                except grpc.RpcError:
                    continue
                self.samples.append([round(time.perf_counter() - self.started, 3), head, *applied])
                self._stop.wait(self._every)
        finally:
            log.close()
            for c in channels:
                c.close()


def plot(result: dict) -> Path:
    import matplotlib.pyplot as plt

    path = plot_path("bench_import")
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(11, 3.5), gridspec_kw={"width_ratios": [2, 1]})
    samples = np.asarray(result["timeline"]["samples"], float)
    if samples.size:
        ax.plot(samples[:, 0], samples[:, 1], c="k", label="log head (gmco import)")
        for i in range(2, samples.shape[1]):
            ax.plot(samples[:, 0], samples[:, i], label=f"shard {i - 2} applied_lsn", alpha=0.8)
        done = samples[samples[:, 1] >= result["last_lsn"], 0]
        if done.size:
            ax.axvline(done[0], ls=":", c="grey", label="last entry committed")
    ax.set(xlabel="seconds since the gmco import process started", ylabel="lsn",
           title=f"{result['items']:,} x {result['dim']} into the log: {result['caught_up_items_per_second']:,.0f}"
                 " items/s caught up")
    ax.legend(fontsize=8)
    bx.bar(["importer", "shards (both)"], [result["importer_cpu_seconds"], result["shards_cpu_seconds"]])
    bx.set(ylabel="CPU seconds", title="CPU spent on the import")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def write_parquet(path: Path, n: int, dim: int, first_id: int, seed: int = 11) -> float:
    """Seconds to write n items: FP16 bytes vectors and every attribute column."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    t = time.perf_counter()
    rng = np.random.default_rng(seed)
    writer = None
    for start in range(0, n, 50_000):
        m = min(50_000, n - start)
        vectors = rng.standard_normal((m, dim), dtype=np.float32)
        vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
        raw = vectors.astype("<f2").tobytes()
        table = pa.table({
            "media_id": pa.array(np.arange(first_id + start, first_id + start + m, dtype=np.uint64)),
            "vector": pa.FixedSizeBinaryArray.from_buffers(pa.binary(2 * dim), m, [None, pa.py_buffer(raw)]),
            "genre_ids": pa.array([[int(g)] for g in rng.integers(0, 40, m)], pa.list_(pa.uint32())),
            "rating": pa.array(rng.integers(0, 5, m), pa.uint32()),
            "region_mask": pa.array(np.full(m, (1 << 8) - 1), pa.uint64()),
            "format_mask": pa.array(np.full(m, 0b111), pa.uint64()),
            "release_year": pa.array(rng.integers(1950, 2026, m), pa.uint32()),
            "popularity": pa.array(rng.random(m, dtype=np.float32)),
        })
        if writer is None:
            writer = pq.ParquetWriter(path, table.schema, compression="none")
        writer.write_table(table, row_group_size=10_000)
    assert writer is not None
    writer.close()
    return time.perf_counter() - t


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--items", type=int, default=200_000, help="items to import (%(default)s)")
    p.add_argument("--dim", type=int, default=1024, help="embedding dimension (%(default)s)")
    p.add_argument("--catalogue-items", type=int, default=20_000, help="demo catalogue the stack starts with")
    p.add_argument("--batch-size", type=int, default=5000, help="rows per log transaction (%(default)s)")
    args = p.parse_args()

    with tempfile.TemporaryDirectory(prefix="bench-import-") as tmp:
        work = Path(tmp)
        source = work / "items.parquet"
        gen_seconds = write_parquet(source, args.items, args.dim, first_id=10**12)
        print(f"wrote {args.items} x {args.dim} to {source} in {gen_seconds:.1f} s", flush=True)
        config = StackConfig(items=args.catalogue_items, dim=args.dim, shards=2, routers=1, run_dir=work / "run",
                             base_port=None, start_timeout=900)
        with Stack(config) as stack:
            shards = [s.target for s in stack.shard_services]
            command = [sys.executable, "-m", "gmco_cli", "import", str(source), "--catalog-dsn", stack.catalog_dsn,
                       "--dim", str(args.dim), "--batch-size", str(args.batch_size), "--state",
                       str(work / "state.json"), "--quiet", *(a for t in shards for a in ("--wait-for", t))]
            shard_pids = [s.pid for s in stack.shard_services]
            shard_cpu0 = [cpu_seconds(p) for p in shard_pids]
            usage0 = resource.getrusage(resource.RUSAGE_CHILDREN)
            t = time.perf_counter()
            with Timeline(stack.catalog_dsn, shards) as timeline:
                done = subprocess.run(command, capture_output=True, text=True, check=True)
            wall = time.perf_counter() - t
            usage1 = resource.getrusage(resource.RUSAGE_CHILDREN)
            importer_cpu = (usage1.ru_utime - usage0.ru_utime) + (usage1.ru_stime - usage0.ru_stime)
            shards_cpu = sum(cpu_seconds(p) - c for p, c in zip(shard_pids, shard_cpu0, strict=True))
            print(done.stdout, flush=True)
            m = re.search(r"imported (\d+) items .* in ([\d.]+) s: .*last lsn (\d+)", done.stdout)
            c = re.search(r"applied lsn \d+ ([\d.]+) s after", done.stdout)
            assert m and c, done.stdout
            appended, seconds, last_lsn = int(m.group(1)), float(m.group(2)), int(m.group(3))
            catch_up = float(c.group(1))
            wanted = [10**12, 10**12 + args.items - 1]
            read_back = []
            for target in shards:
                with grpc.insecure_channel(target) as ch:
                    got = shard_service_pb2_grpc.ShardServiceStub(ch).GetMedia(
                        shard_service_pb2.GetMediaRequest(media_ids=wanted), timeout=10)
                read_back += [i.media_id for i in got.items]
            read_back.sort()
            with grpc.insecure_channel(stack.envoy_target) as ch:
                stub = router_service_pb2_grpc.RecommendationServiceStub(ch)
                rec = stub.Recommend(rpb.RecommendRequest(user_id="bench-import", k=10, min_lsn=last_lsn),
                                     metadata=[("x-user-id", "bench-import")], timeout=10)
    result = {
        "command": " ".join(["gmco", "import", "items.parquet", "--catalog-dsn", "<stack log>", "--dim",
                             str(args.dim), "--batch-size", str(args.batch_size), "--wait-for", "<each shard>"]),
        "items": args.items, "dim": args.dim, "batch_size": args.batch_size, "shards": 2,
        "catalogue_items_at_start": args.catalogue_items, "log": "SQLite (the local stack's)",
        "appended": appended, "import_seconds": seconds, "append_items_per_second": appended / seconds,
        "catch_up_seconds_after_import": catch_up,
        "caught_up_items_per_second": appended / (seconds + catch_up),
        "process_wall_seconds": wall, "last_lsn": last_lsn,
        # CPU the import cost: the gmco import process, and both shards tailing and applying the log
        "importer_cpu_seconds": importer_cpu, "shards_cpu_seconds": shards_cpu,
        "items_per_cpu_second": appended / (importer_cpu + shards_cpu),
        "read_back_ids": read_back, "recommend_with_min_lsn_items": len(rec.items),
        "parquet_write_seconds": gen_seconds,
        "timeline": {"columns": ["seconds", "log_head_lsn", *(f"shard_{i}_applied_lsn" for i in range(2))],
                     "samples": timeline.samples},
    }
    path = write_json("bench_import", result)
    plot(result)
    print(f"append {result['append_items_per_second']:,.0f} items/s, caught up "
          f"{result['caught_up_items_per_second']:,.0f} items/s; CPU: importer {importer_cpu:.1f} s, shards "
          f"{shards_cpu:.1f} s ({result['items_per_cpu_second']:,.0f} items per CPU second) -> {path}")


if __name__ == "__main__":
    main()
