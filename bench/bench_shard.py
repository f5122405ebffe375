"""make bench-shard: exact vs HNSW on the 100,000 x 1024 FP16 clustered reference.

Reports build time, recall@10 against exact ground truth, QPS at batch 1 and 32 in-process and
through the gRPC service on loopback (a separate server process loading a snapshot), filtered recall
and QPS at 10% and 1% selectivity, and the measured exact-vs-index crossover that sets
GMCO_SHARD_EXACT_FRACTION. Writes bench/results/bench_shard.{json,png}.

QPS is taken two ways, each in-process and over gRPC: one call at a time (latency-bound), and
saturated (``--threads`` threads in-process against ``--in-flight`` concurrent gRPC calls).
HNSW is built with the service's default M and efConstruction unless overridden.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

import grpc
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import plot_path, qps, serve_snapshot, write_json
from gmco.common.v1 import common_pb2
from gmco.shard.v1 import shard_service_pb2 as pb
from gmco.shard.v1 import shard_service_pb2_grpc
from gmco_common.datagen import exact_ground_truth, generate_catalogue, generate_queries
from gmco_common.vectors import encode_batch
from gmco_shard import bitmaps
from gmco_shard.columns import columns_from_catalogue
from gmco_shard.config import Settings
from gmco_shard.filters import evaluate_filter
from gmco_shard.index.exact import exact_search
from gmco_shard.index.params import HnswParams, IndexParams
from gmco_shard.snapshot import save_snapshot
from gmco_shard.store import ShardStore
from gmco_testing.procs import stop_process

K = 10
TARGET_RECALL = 0.95
_DEFAULTS = Settings()


def recall(got_ids: np.ndarray, gt_ids: np.ndarray) -> float:
    """recall@10 by media id (0 = empty slot), so that backends that reorder rows (IVF) compare alike."""
    hits = [len(set(r[r > 0].tolist()) & set(g[g > 0].tolist())) / max(1, min(K, int((g > 0).sum())))
            for r, g in zip(got_ids, gt_ids, strict=True)]
    return float(np.mean(hits))


def genre_filter(cat, target: float) -> common_pb2.Filter:
    """Allowed genres chosen greedily (rarest first, counting every genre column) to reach ~``target``."""
    n_genres = int(cat.genre_ids.max()) + 1
    member = np.zeros((len(cat), n_genres), bool)
    for col in range(cat.genre_ids.shape[1]):
        has = cat.genre_ids[:, col] >= 0
        member[np.flatnonzero(has), cat.genre_ids[has, col]] = True
    chosen: list[int] = []
    allowed = np.zeros(len(cat), bool)
    for g in np.argsort(member.sum(0)):
        trial = allowed | member[:, g]
        if trial.mean() > target * 1.25 and chosen:
            continue
        chosen.append(int(g))
        allowed = trial
        if allowed.mean() >= target * 0.9:
            break
    return common_pb2.Filter(allowed_genre_ids=chosen)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--items", type=int, default=100_000)
    ap.add_argument("--dim", type=int, default=1024)
    ap.add_argument("--queries", type=int, default=200)
    ap.add_argument("--hnsw-m", type=int, default=_DEFAULTS.hnsw_m)
    ap.add_argument("--backends", nargs="+", default=["exact", "hnsw", "ivf"])
    ap.add_argument("--ef-construction", type=int, default=_DEFAULTS.hnsw_ef_construction)
    ap.add_argument("--ef", type=int, nargs="+", default=[32, 64, 128, 256])
    ap.add_argument("--seconds", type=float, default=2.0, help="length of each timed run (3 runs, median)")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 2, help="in-process threads when saturated")
    ap.add_argument("--in-flight", type=int, default=4, help="concurrent gRPC calls when saturated")
    a = ap.parse_args()

    t0 = time.perf_counter()
    cat = generate_catalogue(a.items, a.dim, seed=0, progress=True)
    queries = generate_queries(cat, a.queries, seed=5)
    gt_rows = exact_ground_truth(cat.vectors, queries, K)
    gt = np.where(gt_rows >= 0, cat.media_ids[np.maximum(gt_rows, 0)], 0)
    print(f"data + ground truth in {time.perf_counter() - t0:.1f}s")
    cols = columns_from_catalogue(cat)
    out: dict = {"items": a.items, "dim": a.dim, "k": K, "queries": a.queries, "backends": {}}

    for backend in a.backends:
        out["backends"][backend] = bench_backend(backend, a, cat, cols, queries, gt, out)

    path = write_json("bench_shard", out)
    plot(out)
    print(f"wrote {path}")


def bench_backend(backend: str, a: argparse.Namespace, cat, cols, queries: np.ndarray, gt: np.ndarray,
                  out: dict) -> dict:
    """Build, recall/QPS sweep, saturated QPS, filtered search and gRPC for one backend (crossover for HNSW)."""
    params = IndexParams(hnsw=HnswParams(m=a.hnsw_m, ef_construction=a.ef_construction))
    store = ShardStore(a.dim, backend, params)
    t = time.perf_counter()
    store.bulk_load(np.asarray(cat.vectors), cols, progress=True)
    res: dict = {"build_seconds": time.perf_counter() - t, "hnsw_m": a.hnsw_m,
                 "hnsw_ef_construction": a.ef_construction, "sweep": []}
    for ef in {"hnsw": a.ef, "ivf": [4, 8, 16, 32]}.get(backend, [0]):
        r = recall(store.search(queries, K, ef=ef).media_ids, gt)
        b1 = qps(lambda ef=ef: store.search(queries[:1], K, ef=ef), 1, a.seconds)
        b32 = qps(lambda ef=ef: store.search(queries[:32], K, ef=ef), 32, a.seconds)
        res["sweep"].append({"ef": ef, "recall_at_10": r, "qps_b1": b1["qps"], "qps_b32": b32["qps"],
                             "p50_ms_b1": b1["p50_ms"], "p99_ms_b1": b1["p99_ms"]})
        print(f"{backend} ef={ef} recall@10={r:.3f} qps b1={b1['qps']:.0f} b32={b32['qps']:.0f}")
    ok = [s for s in res["sweep"] if s["recall_at_10"] >= TARGET_RECALL]
    chosen = min(ok, key=lambda s: s["ef"]) if ok else res["sweep"][-1]
    ef = res["chosen_ef"] = chosen["ef"]
    res["saturated"] = {f"qps_b{b}": threaded_qps(lambda b=b: store.search(queries[:b], K, ef=ef), b, a.threads,
                                                  a.seconds) for b in (1, 32)}
    # Filtered search at 10% and 1% selectivity; the store picks exact or the pre-filtered index.
    res["filtered"] = {}
    for target in (0.10, 0.01):
        f = genre_filter(cat, target)
        allow = evaluate_filter(cols, f)
        fgt_rows = exact_ground_truth(cat.vectors, queries, K, allow)
        fgt = np.where(fgt_rows >= 0, cat.media_ids[np.maximum(fgt_rows, 0)], 0)
        sr = store.search(queries, K, f, ef=ef)
        fb1 = qps(lambda f=f: store.search(queries[:1], K, f, ef=ef), 1, a.seconds)
        fb32 = qps(lambda f=f: store.search(queries[:32], K, f, ef=ef), 32, a.seconds)
        res["filtered"][f"{target:.0%}"] = {"allowed_fraction": float(allow.mean()), "exact_path": sr.exact,
                                           "recall_at_10": recall(sr.media_ids, fgt), "qps_b1": fb1["qps"],
                                           "qps_b32": fb32["qps"]}
        print(f"{backend} filter {allow.mean():.3f}: {res['filtered'][f'{target:.0%}']}")
    # Through gRPC: a separate server process loads a snapshot of this store.
    res["grpc"] = grpc_qps(store, a, queries, ef)
    for b in (1, 32):
        res[f"grpc_ratio_b{b}"] = res["grpc"][f"seq_qps_b{b}"] / chosen[f"qps_b{b}"]
        res[f"grpc_ratio_saturated_b{b}"] = res["grpc"][f"sat_qps_b{b}"] / res["saturated"][f"qps_b{b}"]
    print(f"{backend} in-process saturated {res['saturated']} grpc {res['grpc']}")
    print(f"{backend} gRPC/in-process: one call b1={res['grpc_ratio_b1']:.2f} b32={res['grpc_ratio_b32']:.2f}; "
          f"saturated b1={res['grpc_ratio_saturated_b1']:.2f} b32={res['grpc_ratio_saturated_b32']:.2f}")
    if backend == a.backends[-1]:
        out["crossover"] = crossover(store, cat, cols, queries, ef, a.seconds)
        out["measured_exact_fraction"] = exact_threshold(out["crossover"])
        print(f"measured exact threshold: {out['measured_exact_fraction']}")
    return res


def threaded_qps(fn, per_call: int, threads: int, seconds: float) -> float:
    """Median items/s over 3 runs of ``threads`` threads calling ``fn`` (faiss and numpy release the GIL)."""
    fn()
    runs = []
    for _ in range(3):
        counts = [0] * threads
        stop = time.perf_counter() + seconds

        def work(i: int, stop: float = stop, counts: list[int] = counts) -> None:
            while time.perf_counter() < stop:
                fn()
                counts[i] += 1

        start = time.perf_counter()
        pool = [threading.Thread(target=work, args=(i,)) for i in range(threads)]
        for t in pool:
            t.start()
        for t in pool:
            t.join()
        runs.append(sum(counts) * per_call / (time.perf_counter() - start))
    return float(np.median(runs))


def crossover(store: ShardStore, cat, cols, queries, ef: int, seconds: float) -> list[dict]:
    """Exact search over the allowed rows vs the index's own filtered search, by allowed fraction (batch 32):
    QPS and the index path's recall@10 against the filtered exact ground truth."""
    rows: list[dict] = []
    seg = next(s for s in store.segments() if s.sealed)
    ids = seg.cols.media_ids
    for target in (0.01, 0.02, 0.05, 0.1, 0.2, 0.4):
        f = genre_filter(cat, target)
        allow = evaluate_filter(cols, f)
        if rows and abs(rows[-1]["allowed_fraction"] - allow.mean()) < 1e-3:
            continue  # genre granularity gave the same filter again
        fgt_rows = exact_ground_truth(cat.vectors, queries, K, allow)
        fgt = np.where(fgt_rows >= 0, cat.media_ids[np.maximum(fgt_rows, 0)], 0)
        # the segment's own row order (IVF groups rows by list): the same filter on its columns
        words = bitmaps.from_bools(evaluate_filter(seg.cols, f))
        q = queries[:32]
        ex = qps(lambda q=q, w=words: exact_search(seg.vectors, q, K, "ip", allow=w), 32, seconds / 2, 2)
        ix = qps(lambda q=q, w=words: seg.index.search(q, K, w, ef), 32, seconds / 2, 2)
        found = seg.index.search(queries, K, words, ef)[1]
        index_recall = recall(np.where(found >= 0, ids[np.maximum(found, 0)], 0), fgt)
        rows.append({"allowed_fraction": float(allow.mean()), "exact_qps": ex["qps"], "index_qps": ix["qps"],
                     "index_recall_at_10": index_recall})
        print(f"crossover {allow.mean():.4f}: exact {ex['qps']:.0f} vs index {ix['qps']:.0f} "
              f"(index recall {index_recall:.3f})")
    return rows


def exact_threshold(rows: list[dict]) -> float:
    """The largest measured allowed fraction at which the pre-filtered index loses, on speed or on recall."""
    losing = [r["allowed_fraction"] for r in rows
              if r["index_qps"] < r["exact_qps"] or r["index_recall_at_10"] < TARGET_RECALL]
    return max(losing, default=0.0)


def grpc_qps(store: ShardStore, a, queries: np.ndarray, ef: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        save_snapshot(store, Path(tmp))
        proc, port, _ = serve_snapshot(Path(tmp), {"GMCO_SHARD_INDEX_BACKEND": store.backend,
                                                   "GMCO_SHARD_HNSW_M": str(a.hnsw_m)}, a.dim)
        try:
            return asyncio.run(_drive(port, queries, ef, a.seconds, a.in_flight))
        finally:
            stop_process(proc)


async def _drive(port: int, queries: np.ndarray, ef: int, seconds: float, in_flight: int) -> dict:
    """Median items/s over 3 runs, one call at a time (seq_) and with ``in_flight`` concurrent calls (sat_)."""
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
        stub = shard_service_pb2_grpc.ShardServiceStub(ch)
        out = {}
        for batch in (1, 32):
            req = pb.SearchRequest(queries=encode_batch(queries[:batch]), k=K, params=pb.SearchParams(ef=ef))
            await stub.Search(req)
            for label, concurrency in (("seq", 1), ("sat", in_flight)):
                runs = []
                for _ in range(3):
                    calls = [0]
                    start = time.perf_counter()

                    async def caller(start: float = start, calls: list[int] = calls,
                                     req: pb.SearchRequest = req) -> None:
                        while time.perf_counter() - start < seconds:
                            await stub.Search(req)
                            calls[0] += 1

                    await asyncio.gather(*(caller() for _ in range(concurrency)))
                    runs.append(calls[0] * batch / (time.perf_counter() - start))
                out[f"{label}_qps_b{batch}"] = float(np.median(runs))
        return out


def plot(out: dict) -> None:
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for name, res in out["backends"].items():
        rec = [s["recall_at_10"] for s in res["sweep"]]
        axes[0].plot(rec, [s["qps_b1"] for s in res["sweep"]], "o-", label=f"{name} batch 1")
        axes[0].plot(rec, [s["qps_b32"] for s in res["sweep"]], "s--", label=f"{name} batch 32")
    axes[0].set(xlabel="recall@10", ylabel="queries/s (in-process)", yscale="log", title="QPS vs recall")
    axes[0].legend()
    cx = out.get("crossover", [])
    fr = [c["allowed_fraction"] for c in cx]
    axes[1].plot(fr, [c["exact_qps"] for c in cx], "o-", label="exact over allowed")
    axes[1].plot(fr, [c["index_qps"] for c in cx], "s-", label="HNSW pre-filter")
    for f, c in zip(fr, cx, strict=True):
        axes[1].annotate(f"R={c['index_recall_at_10']:.2f}", (f, c["index_qps"]), textcoords="offset points",
                         xytext=(0, 6), fontsize=8, ha="center")
    if out.get("measured_exact_fraction"):
        axes[1].axvline(out["measured_exact_fraction"], color="grey", ls=":", label="exact below this")
    axes[1].set(xlabel="allowed fraction", ylabel="queries/s (batch 32)", xscale="log", yscale="log",
                title="filtered search: exact vs index")
    axes[1].legend()
    fig.tight_layout()
    fig.savefig(plot_path("bench_shard"))


if __name__ == "__main__":
    main()
