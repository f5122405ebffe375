"""make bench-milvus: the project's HNSW shard vs Milvus, side by side, on the 100,000 x 1024 clustered reference.

Same data, same queries, k=10, exact ground truth. Three systems:
  (a) the shard service with the hnsw backend, through gRPC (a server process that loads a snapshot);
  (b) the shard service with the milvus backend on Milvus Lite, through gRPC (same way);
  (c) pymilvus querying that Milvus Lite collection directly (Milvus Lite runs inside the client process).
(b) builds the Milvus Lite collection (insert, flush, index on load); (c) opens the same .db file afterwards,
so its build time is (b)'s and its own figure is the load time. Each system sweeps the search breadth (ef)
and reports recall@10 and QPS at batch 1 and 32; the QPS ratio is taken at the smallest swept ef that
reaches recall@10 >= 0.95. It also measures the Milvus Lite loading caveat on a small collection: search
time right after inserting into a loaded collection vs after release + load.
Writes bench/results/bench_milvus.{json,png}.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import grpc
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import plot_path, qps, serve_snapshot, write_json
from gmco.shard.v1 import shard_service_pb2 as pb
from gmco.shard.v1 import shard_service_pb2_grpc
from gmco_common.datagen import exact_ground_truth, generate_catalogue, generate_queries
from gmco_common.vectors import encode_batch
from gmco_shard.columns import columns_from_catalogue
from gmco_shard.index.params import HnswParams, IndexParams, MilvusParams
from gmco_shard.snapshot import save_snapshot
from gmco_shard.store import ShardStore
from gmco_testing.procs import stop_process

K = 10
TARGET = 0.95
COLLECTION = "bench"


def recall(got: np.ndarray, want: np.ndarray) -> float:
    return float(np.mean([len(set(g.tolist()) & set(w.tolist())) / K for g, w in zip(got, want, strict=True)]))


def sweep(name: str, search, queries: np.ndarray, gt_ids: np.ndarray, efs: list[int], seconds: float) -> list[dict]:
    """``search(batch, ef) -> media ids (q, K)``; recall over all queries, QPS at batch 1 and 32."""
    out = []
    for ef in efs:
        got = np.concatenate([search(queries[i:i + 32], ef) for i in range(0, len(queries), 32)])
        r = recall(got, gt_ids)
        b1 = qps(lambda ef=ef: search(queries[:1], ef), 1, seconds)
        b32 = qps(lambda ef=ef: search(queries[:32], ef), 32, seconds)
        out.append({"ef": ef, "recall_at_10": r, "qps_b1": b1["qps"], "qps_b32": b32["qps"],
                    "p50_ms_b1": b1["p50_ms"], "p99_ms_b1": b1["p99_ms"]})
        print(f"{name} ef={ef} recall@10={r:.3f} qps b1={b1['qps']:.0f} b32={b32['qps']:.0f}", flush=True)
    return out


def at_target(points: list[dict]) -> dict | None:
    ok = [p for p in points if p["recall_at_10"] >= TARGET]
    return min(ok, key=lambda p: p["ef"]) if ok else None


def grpc_search(port: int):
    stub = shard_service_pb2_grpc.ShardServiceStub(grpc.insecure_channel(
        f"127.0.0.1:{port}", options=[("grpc.max_receive_message_length", 64 << 20)]))

    def search(batch: np.ndarray, ef: int) -> np.ndarray:
        resp = stub.Search(pb.SearchRequest(queries=encode_batch(batch), k=K, params=pb.SearchParams(ef=ef)))
        return np.asarray([[it.media_id for it in r.items] + [0] * (K - len(r.items)) for r in resp.results],
                          np.uint64)

    return search


def shard_system(name: str, backend: str, params: IndexParams, env_extra: dict[str, str], cat, cols, queries,
                 gt_ids, a, before_serving=None) -> dict:
    store = ShardStore(a.dim, backend, params)
    t = time.perf_counter()
    store.bulk_load(np.asarray(cat.vectors), cols, progress=True)
    build = time.perf_counter() - t
    print(f"{name}: built in {build:.1f}s", flush=True)
    with tempfile.TemporaryDirectory() as snap:
        save_snapshot(store, Path(snap))
        del store
        if before_serving is not None:
            before_serving()
        proc, port, load = serve_snapshot(Path(snap), {"GMCO_SHARD_INDEX_BACKEND": backend, **env_extra}, a.dim)
        print(f"{name}: server loaded the snapshot and serves after {load:.1f}s", flush=True)
        try:
            points = sweep(name, grpc_search(port), queries, gt_ids, a.ef, a.seconds)
        finally:
            stop_process(proc)
    return {"build_seconds": build, "load_seconds": load, "sweep": points}


def pymilvus_system(db: str, cat, queries, gt_ids, a) -> dict:
    from pymilvus import MilvusClient

    client = MilvusClient(db)
    name = next(c for c in client.list_collections() if c.startswith(COLLECTION + "_"))
    t = time.perf_counter()
    client.load_collection(name)
    load = time.perf_counter() - t
    print(f"pymilvus: loaded {name} in {load:.1f}s", flush=True)

    def search(batch: np.ndarray, ef: int) -> np.ndarray:
        hits = client.search(name, data=list(np.asarray(batch, np.float32)), limit=K, output_fields=["row"],
                             search_params={"metric_type": "IP", "params": {"ef": max(ef, K)}})
        rows = np.asarray([[h.id for h in found] + [-1] * (K - len(found)) for found in hits], np.int64)
        return np.where(rows >= 0, cat.media_ids[np.maximum(rows, 0)], 0)

    points = sweep("pymilvus", search, queries, gt_ids, a.ef, a.seconds)
    client.close()
    return {"load_seconds": load, "sweep": points}


def lite_caveat(tmp: Path, dim: int, n: int) -> dict:
    """Search time right after inserting into a loaded Milvus Lite collection, then after release + load."""
    from pymilvus import DataType, MilvusClient

    client = MilvusClient(str(tmp / "caveat.db"))
    schema = MilvusClient.create_schema(auto_id=False)
    schema.add_field("row", DataType.INT64, is_primary=True)
    schema.add_field("vector", DataType.FLOAT_VECTOR, dim=dim)
    index = MilvusClient.prepare_index_params()
    index.add_index("vector", index_type="HNSW", metric_type="IP", params={"M": 16, "efConstruction": 100})
    client.create_collection("caveat", schema=schema, index_params=index)  # created loaded
    vectors = np.asarray(generate_catalogue(n, dim, seed=1).vectors, np.float32)
    for start in range(0, n, 5000):
        client.insert("caveat", [{"row": i, "vector": vectors[i]} for i in range(start, min(n, start + 5000))])

    def per_query_ms() -> float:
        t = time.perf_counter()
        for i in range(5):
            client.search("caveat", data=[vectors[i]], limit=K, output_fields=["row"],
                          search_params={"params": {"ef": 64}})
        return (time.perf_counter() - t) / 5 * 1e3

    out = {"rows": n, "ms_per_query_after_insert": per_query_ms()}
    t = time.perf_counter()
    client.flush("caveat")
    client.release_collection("caveat")
    client.load_collection("caveat")
    out["flush_release_load_seconds"] = time.perf_counter() - t
    out["ms_per_query_after_reload"] = per_query_ms()
    client.close()
    print(f"Milvus Lite caveat: {out}", flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--items", type=int, default=100_000)
    ap.add_argument("--dim", type=int, default=1024)
    ap.add_argument("--queries", type=int, default=200)
    ap.add_argument("--hnsw-m", type=int, default=32, help="M of both HNSW indexes")
    ap.add_argument("--ef-construction", type=int, default=100, help="efConstruction of both HNSW indexes")
    ap.add_argument("--ef", type=int, nargs="+", default=[16, 32, 64, 128, 256, 512])
    ap.add_argument("--seconds", type=float, default=1.0, help="length of each timed run (3 runs, median)")
    ap.add_argument("--caveat-rows", type=int, default=10_000)
    a = ap.parse_args()
    from milvus_lite.server_manager import server_manager_instance

    t0 = time.perf_counter()
    cat = generate_catalogue(a.items, a.dim, seed=0, progress=True)
    queries = generate_queries(cat, a.queries, seed=5)
    gt_ids = cat.media_ids[exact_ground_truth(cat.vectors, queries, K)]
    cols = columns_from_catalogue(cat)
    print(f"data + ground truth in {time.perf_counter() - t0:.1f}s", flush=True)
    out: dict = {"items": a.items, "dim": a.dim, "k": K, "queries": a.queries, "hnsw_m": a.hnsw_m,
                 "ef_construction": a.ef_construction, "systems": {}}
    hnsw_env = {"GMCO_SHARD_HNSW_M": str(a.hnsw_m), "GMCO_SHARD_HNSW_EF_CONSTRUCTION": str(a.ef_construction)}
    params = IndexParams(hnsw=HnswParams(m=a.hnsw_m, ef_construction=a.ef_construction))
    with tempfile.TemporaryDirectory() as tmp:
        db = str(Path(tmp) / "milvus.db")
        out["systems"]["shard_hnsw"] = shard_system("shard hnsw", "hnsw", params, hnsw_env, cat, cols, queries,
                                                    gt_ids, a)
        milvus_env = {**hnsw_env, "GMCO_SHARD_MILVUS_URI": db, "GMCO_SHARD_MILVUS_COLLECTION": COLLECTION}
        out["systems"]["shard_milvus"] = shard_system(
            "shard milvus", "milvus", IndexParams(hnsw=HnswParams(m=a.hnsw_m, ef_construction=a.ef_construction),
                                                  milvus=MilvusParams(uri=db, collection=COLLECTION)),
            milvus_env, cat, cols, queries, gt_ids, a,
            # Milvus Lite runs inside the process that opened the file: let the server process have it.
            before_serving=lambda: server_manager_instance.release_server(db))
        direct = pymilvus_system(db, cat, queries, gt_ids, a)
        direct["build_seconds"] = out["systems"]["shard_milvus"]["build_seconds"]
        out["systems"]["pymilvus_lite"] = direct
        server_manager_instance.release_server(db)
        out["lite_caveat"] = lite_caveat(Path(tmp), a.dim, a.caveat_rows)

    ref = at_target(out["systems"]["pymilvus_lite"]["sweep"])
    out["at_recall_0.95"] = {name: at_target(s["sweep"]) for name, s in out["systems"].items()}
    own = out["at_recall_0.95"]["shard_hnsw"]
    if own and ref:
        out["qps_ratio_shard_hnsw_vs_pymilvus_lite"] = {b: own[f"qps_{b}"] / ref[f"qps_{b}"] for b in ("b1", "b32")}
    print(f"at recall@10 >= {TARGET}: {out['at_recall_0.95']}")
    print(f"ratio: {out.get('qps_ratio_shard_hnsw_vs_pymilvus_lite')}")
    path = write_json("bench_milvus", out)
    plot(out)
    print(f"wrote {path}")


def plot(out: dict) -> None:
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for ax, batch in zip(axes, ("b1", "b32"), strict=True):
        for name, res in out["systems"].items():
            pts = res["sweep"]
            ax.plot([p["recall_at_10"] for p in pts], [p[f"qps_{batch}"] for p in pts], "o-", label=name)
        ax.axvline(TARGET, color="grey", linestyle=":")
        ax.set(xlabel="recall@10", ylabel="queries/s", yscale="log",
               title=f"QPS vs recall, batch {batch[1:]} ({out['items']:,} x {out['dim']})")
        ax.legend()
    fig.tight_layout()
    fig.savefig(plot_path("bench_milvus"))


if __name__ == "__main__":
    main()
