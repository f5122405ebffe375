"""Shared benchmark helpers: timing loops, medians, results files and plots."""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

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
