"""make bench-milvus: the project's HNSW shard vs Milvus, side by side, on the 100,000 x 1024 clustered reference.

Same data, same queries, k=10, exact ground truth. Five systems:
  (a) the shard service with the hnsw backend, through gRPC (a server process that loads a snapshot);
  (b) the shard service with the milvus backend on Milvus Lite, through gRPC (same way);
  (c) pymilvus querying that Milvus Lite collection directly (Milvus Lite runs inside the client process);
  (d) the shard service with the milvus backend on a Milvus 2.3.5 standalone server, through gRPC (same way);
  (e) pymilvus querying that server's collection directly.
The server is gmco_testing.milvus.MilvusServer (the `milvus` wheel's binary, data in a temporary directory,
loopback ports). (b) and (d) build their collections (insert, flush, index, load); (c) and (e) open the
same collections afterwards, so their build time is (b)'s and (d)'s and their own figure is the load time.
Each system sweeps the search breadth (ef) and reports recall@10 and QPS at batch 1 and 32; QPS ratios
are taken at the smallest swept ef that reaches recall@10 >= 0.95. It also measures the Milvus Lite loading
caveat on a small collection: search time right after inserting into a loaded collection vs after
release + load. Writes bench/results/<--name>.{json,png} (default bench_milvus).
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
from gmco_shard.index.milvus import vector_dtype
from gmco_shard.index.params import HnswParams, IndexParams, MilvusParams
from gmco_shard.snapshot import save_snapshot
from gmco_shard.store import ShardStore
from gmco_testing.milvus import MilvusServer
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


def pymilvus_system(name: str, uri: str, cat, queries, gt_ids, a) -> dict:
    """pymilvus straight at the collection the shard built at ``uri`` (a Lite file or a server)."""
    from pymilvus import MilvusClient

    client = MilvusClient(uri)
    params = MilvusParams(uri=uri)
    version = "lite" if params.lite else client.get_server_version()
    dtype = vector_dtype(params, None if params.lite else version)  # what the shard's build chose
    collection = next(c for c in client.list_collections() if c.startswith(COLLECTION + "_"))
    t = time.perf_counter()
    client.load_collection(collection)
    load = time.perf_counter() - t
    print(f"{name}: loaded {collection} in {load:.1f}s", flush=True)

    def search(batch: np.ndarray, ef: int) -> np.ndarray:
        hits = client.search(collection, data=list(np.asarray(batch, dtype)), limit=K, output_fields=["row"],
                             search_params={"metric_type": "IP", "params": {"ef": max(ef, K)}})
        rows = np.asarray([[h.id for h in found] + [-1] * (K - len(found)) for found in hits], np.int64)
        return np.where(rows >= 0, cat.media_ids[np.maximum(rows, 0)], 0)

    points = sweep(name, search, queries, gt_ids, a.ef, a.seconds)
    client.close()
    return {"load_seconds": load, "milvus_version": version, "vector_type": str(dtype), "sweep": points}


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
    ap.add_argument("--name", default="bench_milvus", help="results file name under bench/results/")
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
    systems = out["systems"]

    def milvus_system(name: str, uri: str, **serving) -> dict:
        env = {**hnsw_env, "GMCO_SHARD_MILVUS_URI": uri, "GMCO_SHARD_MILVUS_COLLECTION": COLLECTION}
        milvus = IndexParams(hnsw=HnswParams(m=a.hnsw_m, ef_construction=a.ef_construction),
                             milvus=MilvusParams(uri=uri, collection=COLLECTION))
        return shard_system(name, "milvus", milvus, env, cat, cols, queries, gt_ids, a, **serving)

    with tempfile.TemporaryDirectory() as tmp:
        db = str(Path(tmp) / "milvus.db")
        systems["shard_hnsw"] = shard_system("shard hnsw", "hnsw", params, hnsw_env, cat, cols, queries, gt_ids, a)
        # Milvus Lite runs inside the process that opened the file: let the server process have it.
        systems["shard_milvus_lite"] = milvus_system(
            "shard milvus lite", db, before_serving=lambda: server_manager_instance.release_server(db))
        systems["pymilvus_lite"] = pymilvus_system("pymilvus lite", db, cat, queries, gt_ids, a)
        systems["pymilvus_lite"]["build_seconds"] = systems["shard_milvus_lite"]["build_seconds"]
        server_manager_instance.release_server(db)
        t = time.perf_counter()
        with MilvusServer() as server:
            print(f"Milvus {server.version} server at {server.uri}: started in {time.perf_counter() - t:.1f}s",
                  flush=True)
            systems["shard_milvus_server"] = milvus_system("shard milvus server", server.uri)
            systems["pymilvus_server"] = pymilvus_system("pymilvus server", server.uri, cat, queries, gt_ids, a)
            systems["pymilvus_server"]["build_seconds"] = systems["shard_milvus_server"]["build_seconds"]
            out["milvus_server"] = {"wheel": server.version, "settings": server.settings}
        out["lite_caveat"] = lite_caveat(Path(tmp), a.dim, a.caveat_rows)

    best = out["at_recall_0.95"] = {name: at_target(s["sweep"]) for name, s in systems.items()}
    own = best["shard_hnsw"]
    out["qps_ratio_shard_hnsw_vs"] = {name: {b: own[f"qps_{b}"] / ref[f"qps_{b}"] for b in ("b1", "b32")}
                                      for name, ref in best.items() if own and ref and name != "shard_hnsw"}
    if "pymilvus_lite" in out["qps_ratio_shard_hnsw_vs"]:
        out["qps_ratio_shard_hnsw_vs_pymilvus_lite"] = out["qps_ratio_shard_hnsw_vs"]["pymilvus_lite"]
    print(f"at recall@10 >= {TARGET}: {best}")
    print(f"QPS ratios of the hnsw shard: {out['qps_ratio_shard_hnsw_vs']}")
    path = write_json(a.name, out)
    plot(out, a.name)
    print(f"wrote {path}")


def plot(out: dict, results_name: str) -> None:
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
    fig.savefig(plot_path(results_name))


if __name__ == "__main__":
    main()
