"""Cache benchmark (``make bench-cache``): the cache service against raw redis-py on one real Redis Cluster,
and the hit ratio of a Zipf(1.1) request stream over 1M users.

Part 1, throughput and latency. A throwaway 6-node Redis Cluster (3 masters + 3 replicas, from
gmco_testing) is started, and the cache service runs as a subprocess on it (``GMCO_CACHE_BACKEND=
redis-cluster``, every other setting at its default, the 50 ms per-call timeout included). In the same
run, from one asyncio client process with each ``--concurrency`` level of calls in flight (1 = unloaded latency; 32 = throughput), for ``--seconds``
each:

    raw get      redis-py RedisCluster GET of a stored RecommendationList (20 items)
    raw put      redis-py RedisCluster SET ... PX 300000 of the same bytes
    service get  CacheService/GetRecommendations of a stored key (a hit)
    service put  CacheService/PutRecommendations of the same list

Keys are drawn uniformly from ``--users`` users whose lists were stored first. Each phase runs
``--repeats`` times, interleaved; the medians are reported. Overhead = service p50 / raw p50 and raw QPS /
service QPS. The client is a single Python process on the same (shared, 2-core) machine as the cluster
and the service, so both paths are bounded by it; the ratio is the figure to read.

Part 2, hit ratio. A request stream is simulated (no servers; simulated clock): Poisson arrivals at
``--rate`` requests/s; each request's user is drawn from a Zipf(1.1) law truncated to 1M users (user of
rank r has probability proportional to r^-1.1); one context per user; with probability ``--feedback``
the request is followed by feedback that bumps the user's state version (the cached list becomes
unreachable). The cache is the service's own in-process TTL LRU (gmco_common.lru.TtlLru) with the
production TTL of 300 s and a capacity of N entries; a miss stores the freshly computed list. The first
half of the stream warms the cache and is not counted.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import grpc
import matplotlib
import numpy as np
from gmco.cache.v1 import cache_service_pb2 as pb
from gmco.cache.v1 import cache_service_pb2_grpc
from gmco.common.v1 import common_pb2
from gmco_common.lru import TtlLru
from gmco_testing.procs import free_port, stop_process, wait_grpc_serving
from gmco_testing.redis_cluster import RedisCluster
from redis.asyncio.cluster import ClusterNode
from redis.asyncio.cluster import RedisCluster as ClusterClient
from tqdm import tqdm

matplotlib.use("Agg")
import matplotlib.pyplot as plt

RESULTS = Path(__file__).parent / "results"
TTL_SECONDS = 300
USERS_ZIPF = 1_000_000
ZIPF_S = 1.1


def recommendation_bytes() -> bytes:
    items = [common_pb2.ScoredItem(media_id=1_000_000 + i, score=1.0 - i / 100, propensity=0.05, shard_id=i % 8)
             for i in range(20)]
    return pb.RecommendationList(items=items, computed_at_unix_ms=int(time.time() * 1000)).SerializeToString()


# -- part 1: service vs raw redis-py ----------------------------------------------------------------
async def closed_loop(call: Callable[[int], Awaitable[object]], users: int, concurrency: int,
                      seconds: float) -> dict[str, float]:
    latencies: list[float] = []
    end = time.perf_counter() + seconds

    async def worker(seed: int) -> None:
        rng = random.Random(seed)
        while (start := time.perf_counter()) < end:
            await call(rng.randrange(users))
            latencies.append(time.perf_counter() - start)

    began = time.perf_counter()
    await asyncio.gather(*(worker(n) for n in range(concurrency)))
    elapsed = time.perf_counter() - began
    ms = np.array(latencies) * 1000
    return {"qps": len(latencies) / elapsed, "p50_ms": float(np.percentile(ms, 50)),
            "p99_ms": float(np.percentile(ms, 99)), "calls": len(latencies)}


async def throughput(cluster: RedisCluster, port: int, args: argparse.Namespace) -> dict:
    value = recommendation_bytes()
    recs = pb.RecommendationList.FromString(value)
    raw = ClusterClient(startup_nodes=[ClusterNode(h, p) for h, p in cluster.startup_nodes], max_connections=256)
    await raw.initialize()
    outcomes = {"hit": 0, "miss": 0, "bypass": 0, "not_stored": 0}
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = cache_service_pb2_grpc.CacheServiceStub(channel)

        async def raw_get(u: int) -> None:
            assert await raw.get(f"rec:v2:{{bench-{u}}}:ctx:1") is not None

        async def raw_put(u: int) -> None:
            await raw.set(f"rec:v2:{{bench-{u}}}:ctx:1", value, px=TTL_SECONDS * 1000)

        async def service_get(u: int) -> None:
            answer = await stub.GetRecommendations(pb.GetRecommendationsRequest(
                user_id=f"bench-{u}", context_hash="ctx", user_version=1), timeout=5)
            outcomes["hit" if answer.hit else "bypass" if answer.bypassed else "miss"] += 1

        async def service_put(u: int) -> None:
            answer = await stub.PutRecommendations(pb.PutRecommendationsRequest(
                user_id=f"bench-{u}", context_hash="ctx", user_version=1, recommendations=recs), timeout=5)
            outcomes["not_stored"] += not answer.stored

        for start in tqdm(range(0, args.users, 1000), desc="storing lists", unit="k users"):
            pipe = raw.pipeline(transaction=False)
            for u in range(start, min(start + 1000, args.users)):
                pipe.set(f"rec:v2:{{bench-{u}}}:ctx:1", value, px=TTL_SECONDS * 1000)
            await pipe.execute()
        phases = {"raw_get": raw_get, "service_get": service_get, "raw_put": raw_put, "service_put": service_put}
        for name, call in phases.items():  # warm-up: connections, code paths
            await closed_loop(call, args.users, max(args.concurrency), 0.5)
        by_concurrency = {}
        for concurrency in args.concurrency:
            runs: dict[str, list[dict[str, float]]] = {name: [] for name in phases}
            for _ in tqdm(range(args.repeats), desc=f"throughput rounds, {concurrency} in flight"):
                for name, call in phases.items():
                    runs[name].append(await closed_loop(call, args.users, concurrency, args.seconds))
            medians = {name: {m: statistics.median(r[m] for r in rs) for m in ("qps", "p50_ms", "p99_ms")}
                       for name, rs in runs.items()}
            overhead = {op: {"p50_ratio": medians[f"service_{op}"]["p50_ms"] / medians[f"raw_{op}"]["p50_ms"],
                             "p99_ratio": medians[f"service_{op}"]["p99_ms"] / medians[f"raw_{op}"]["p99_ms"],
                             "qps_ratio": medians[f"raw_{op}"]["qps"] / medians[f"service_{op}"]["qps"]}
                        for op in ("get", "put")}
            by_concurrency[str(concurrency)] = {"runs": runs, "medians": medians, "overhead": overhead}
    await raw.aclose()
    return {"by_concurrency": by_concurrency, "service_outcomes": outcomes, "value_bytes": len(value)}


def start_service(cluster: RedisCluster) -> tuple[subprocess.Popen, int]:
    port = free_port()
    env = {**os.environ, "GMCO_CACHE_BACKEND": "redis-cluster", "GMCO_CACHE_REDIS_NODES": cluster.nodes_setting,
           "GMCO_CACHE_PORT": str(port), "GMCO_CACHE_LOG_LEVEL": "WARNING"}
    proc = subprocess.Popen([sys.executable, "-m", "gmco_cache"], env=env)
    wait_grpc_serving(f"127.0.0.1:{port}", 60, proc)
    return proc, port


# -- part 2: hit ratio under Zipf(1.1) ------------------------------------------------------------------
def zipf_users(n: int, rng: np.random.Generator) -> np.ndarray:
    weights = np.arange(1, USERS_ZIPF + 1, dtype=np.float64) ** -ZIPF_S
    cdf = np.cumsum(weights)
    cdf /= cdf[-1]
    return np.searchsorted(cdf, rng.random(n))


def simulate(users: np.ndarray, capacity: int, rate: float, feedback: float, seed: int) -> float:
    rng = np.random.default_rng(seed)
    arrivals = np.cumsum(rng.exponential(1 / rate, len(users)))
    bumps = rng.random(len(users)) < feedback
    now = 0.0
    lru = TtlLru(capacity, TTL_SECONDS, clock=lambda: now)
    versions = np.zeros(USERS_ZIPF, dtype=np.int64)
    counted = hits = 0
    half = len(users) // 2
    for i, (user, t, bump) in enumerate(zip(users.tolist(), arrivals.tolist(), bumps.tolist(), strict=True)):
        now = t
        key = f"{user}:{versions[user]}"
        hit = lru.get(key) is not None
        if not hit:
            lru.put(key, b"")
        if bump:
            versions[user] += 1
        if i >= half:
            counted += 1
            hits += hit
    return hits / counted


def hit_ratios(args: argparse.Namespace) -> dict:
    rng = np.random.default_rng(7)
    users = zipf_users(args.requests, rng)
    grid = []
    for capacity in tqdm(args.capacities, desc="hit-ratio simulation"):
        for feedback in args.feedback:
            grid.append({"capacity": capacity, "feedback": feedback,
                         "hit_ratio": simulate(users, capacity, args.rate, feedback, seed=11)})
    return {"users": USERS_ZIPF, "zipf_s": ZIPF_S, "ttl_seconds": TTL_SECONDS, "rate_per_s": args.rate,
            "requests": args.requests, "simulated_seconds": args.requests / args.rate,
            "distinct_users_in_stream": len(np.unique(users)), "grid": grid}


# -- output ---------------------------------------------------------------------------------------------
def plot(result: dict, path: Path) -> None:
    fig, (ax_qps, ax_lat, ax_hit) = plt.subplots(1, 3, figsize=(16, 4.8))
    names = ["raw_get", "service_get", "raw_put", "service_put"]
    levels = list(result["throughput"]["by_concurrency"])
    x = np.arange(len(names))
    width = 0.8 / len(levels)
    for j, level in enumerate(levels):
        med = result["throughput"]["by_concurrency"][level]["medians"]
        offset = (j - (len(levels) - 1) / 2) * width
        ax_qps.bar(x + offset, [med[n]["qps"] for n in names], width, label=f"{level} in flight")
        ax_lat.bar(x + offset, [med[n]["p50_ms"] for n in names], width, label=f"p50, {level} in flight")
        ax_lat.scatter(x + offset, [med[n]["p99_ms"] for n in names], marker="_", s=200, color="black",
                       label="p99" if j == 0 else None)
    for ax, title in ((ax_qps, "QPS (median of runs)"), (ax_lat, "latency, ms (median of runs)")):
        ax.set_xticks(x, names)
        ax.set_title(title)
        ax.legend(fontsize=8)
    ax_lat.set_yscale("log")
    hits = result["hit_ratio"]
    for feedback in sorted({g["feedback"] for g in hits["grid"]}):
        rows = [g for g in hits["grid"] if g["feedback"] == feedback]
        ax_hit.plot([g["capacity"] for g in rows], [g["hit_ratio"] for g in rows], marker="o",
                    label=f"feedback p={feedback}")
    ax_hit.axhline(0.95, color="grey", linestyle="--", label="95% target")
    ax_hit.set_xscale("log")
    ax_hit.set_xlabel("cache capacity (entries)")
    ax_hit.set_title(f"hit ratio, Zipf({ZIPF_S}) over 1M users, TTL {TTL_SECONDS}s, {hits['rate_per_s']:.0f} req/s")
    ax_hit.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seconds", type=float, default=4.0, help="length of one throughput phase")
    p.add_argument("--repeats", type=int, default=3, help="rounds of the four phases")
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 32], help="calls in flight (each is measured)")
    p.add_argument("--users", type=int, default=20_000, help="stored keys for the throughput phases")
    p.add_argument("--rate", type=float, default=5_000, help="simulated requests per second")
    p.add_argument("--requests", type=int, default=3_000_000, help="simulated requests (half are warm-up)")
    p.add_argument("--capacities", type=int, nargs="+", default=[10_000, 50_000, 200_000, 1_000_000])
    p.add_argument("--feedback", type=float, nargs="+", default=[0.0, 0.05],
                   help="probability that a request is followed by a version bump")
    p.add_argument("--out", type=Path, default=RESULTS / "bench_cache.json")
    args = p.parse_args()

    result: dict = {"command": "make bench-cache (" + " ".join(sys.argv) + ")", "cpus": os.cpu_count(),
                    "concurrency": args.concurrency, "phase_seconds": args.seconds, "repeats": args.repeats}
    with RedisCluster() as cluster:
        proc, port = start_service(cluster)
        try:
            result["throughput"] = asyncio.run(throughput(cluster, port, args))
        finally:
            stop_process(proc)
    result["hit_ratio"] = hit_ratios(args)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    plot(result, args.out.with_suffix(".png"))
    for level, run in result["throughput"]["by_concurrency"].items():
        print(f"-- {level} in flight")
        for name, m in run["medians"].items():
            print(f"{name:12s} {m['qps']:9.0f} qps  p50 {m['p50_ms']:6.2f} ms  p99 {m['p99_ms']:6.2f} ms")
        for op, o in run["overhead"].items():
            print(f"overhead {op}: p50 x{o['p50_ratio']:.2f}  p99 x{o['p99_ratio']:.2f}  qps x{o['qps_ratio']:.2f}")
    print("service outcomes:", result["throughput"]["service_outcomes"])
    for g in result["hit_ratio"]["grid"]:
        print(f"capacity {g['capacity']:>9}  feedback {g['feedback']:.2f}  hit ratio {g['hit_ratio']:.4f}")
    print(f"wrote {args.out} and {args.out.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
