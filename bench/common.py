"""Shared benchmark helpers: timing loops, medians, results files, plots, and a shard server process."""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from gmco_testing.procs import free_port, wait_grpc_serving

RESULTS = Path(__file__).resolve().parent / "results"


def machine() -> dict[str, Any]:
    return {"cpus": os.cpu_count(), "machine": platform.machine(), "python": platform.python_version(),
            "load_avg_1m": os.getloadavg()[0]}


def qps(fn: Callable[[], object], per_call: int, min_seconds: float = 2.0, repeats: int = 3) -> dict[str, float]:
    """Median throughput (items/s) and per-call latency over ``repeats`` timed runs."""
    runs, lat = [], []
    fn()  # warm-up
    for _ in range(repeats):
        calls, start = 0, time.perf_counter()
        while (elapsed := time.perf_counter() - start) < min_seconds:
            t = time.perf_counter()
            fn()
            lat.append(time.perf_counter() - t)
            calls += 1
        runs.append(calls * per_call / elapsed)
    lat.sort()
    return {"qps": statistics.median(runs), "p50_ms": lat[len(lat) // 2] * 1e3,
            "p99_ms": lat[min(len(lat) - 1, int(len(lat) * 0.99))] * 1e3, "runs": runs}


def write_json(name: str, doc: dict[str, Any]) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    doc = {"machine": machine(), "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), **doc}
    path.write_text(json.dumps(doc, indent=2, default=float))
    return path


def plot_path(name: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    RESULTS.mkdir(parents=True, exist_ok=True)
    return RESULTS / f"{name}.png"


def serve_snapshot(snapshot: Path, env_extra: dict[str, str], dim: int) -> tuple[subprocess.Popen, int, float]:
    """A shard server process that loads ``snapshot``; returns it, its port and the seconds until SERVING.
    The caller stops it (``gmco_testing.procs.stop_process``)."""
    port = free_port()
    env = {**os.environ, "GMCO_SHARD_PORT": str(port), "GMCO_SHARD_DIM": str(dim),
           "GMCO_SHARD_SNAPSHOT_DIR": str(snapshot), "GMCO_SHARD_SNAPSHOT_INTERVAL_SECONDS": "0",
           "GMCO_SHARD_LOG_LEVEL": "WARNING", "GMCO_SHARD_MAX_MESSAGE_BYTES": str(64 << 20), **env_extra}
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "gmco_shard"], env=env)
    wait_grpc_serving(f"127.0.0.1:{port}", timeout=1200, proc=proc, service="gmco.shard.v1.ShardService")
    return proc, port, time.perf_counter() - start
