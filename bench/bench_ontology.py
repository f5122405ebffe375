"""make bench-ontology: ResolveConstraints p50/p99 and QPS, cached and uncached, in-process and
through gRPC, on the sample ontology (100 genres) and a generated one (10,000 genres).

"Uncached" clears the filter cache before every call, so each call compiles the filter from the
graph. Writes bench/results/bench_ontology.{json,png}.
"""

from __future__ import annotations

import argparse
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
from gmco.common.v1 import common_pb2 as c
from gmco.ontology.v1 import ontology_service_pb2 as pb
from gmco.ontology.v1 import ontology_service_pb2_grpc
from gmco_ontology.backends import EmbeddedBackend
from gmco_ontology.generate import generate
from gmco_ontology.loader import SAMPLE, load_file
from gmco_ontology.servicer import OntologyServicer
from gmco_testing.procs import free_port, stop_process, wait_grpc_serving


def requests(onto, n: int, seed: int = 0) -> list[pb.ResolveConstraintsRequest]:
    rng = np.random.default_rng(seed)
    genres = sorted(i for i, node in onto.nodes.items() if node.kind == pb.NODE_KIND_GENRE)
    regions = sorted(i for i, node in onto.nodes.items() if node.kind == pb.NODE_KIND_REGION)
    devices = sorted(i for i, node in onto.nodes.items() if node.kind == pb.NODE_KIND_DEVICE)
    out = []
    for _ in range(n):
        blocked = [str(g) for g in rng.choice(genres, int(rng.integers(0, 4)), replace=False)]
        out.append(pb.ResolveConstraintsRequest(
            context=c.RequestContext(surface=int(rng.integers(1, 4)), region=str(rng.choice(regions)),
                                     device=str(rng.choice(devices))),
            preferences=c.UserPreferences(blocked_genres=blocked)))
    return out


def stats(lat: list[float], wall: float) -> dict:
    lat_ms = np.array(lat) * 1e3
    return {"p50_ms": float(np.percentile(lat_ms, 50)), "p99_ms": float(np.percentile(lat_ms, 99)),
            "qps": len(lat) / wall}


def in_process(svc: OntologyServicer, reqs, cached: bool, seconds: float) -> dict:
    if cached:
        for r in reqs:
            svc.resolve(r)
    lat, i, start = [], 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        if not cached:
            svc._cache.clear()
        t = time.perf_counter()
        svc.resolve(reqs[i % len(reqs)])
        lat.append(time.perf_counter() - t)
        i += 1
    return stats(lat, time.perf_counter() - start)


def over_grpc(path: Path, reqs, cached: bool, seconds: float) -> dict:
    port = free_port()
    env = {**os.environ, "GMCO_ONTOLOGY_PORT": str(port), "GMCO_ONTOLOGY_FILE": str(path),
           "GMCO_ONTOLOGY_LOG_LEVEL": "WARNING", "GMCO_ONTOLOGY_CACHE_SIZE": "100000" if cached else "1"}
    proc = subprocess.Popen([sys.executable, "-m", "gmco_ontology"], env=env)
    try:
        wait_grpc_serving(f"127.0.0.1:{port}", timeout=120, proc=proc)
        with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
            stub = ontology_service_pb2_grpc.OntologyServiceStub(ch)
            if cached:
                for r in reqs:
                    stub.ResolveConstraints(r)
            lat, i, start = [], 0, time.perf_counter()
            while time.perf_counter() - start < seconds:
                # Uncached: a cache of one entry and distinct requests make every call a compile.
                t = time.perf_counter()
                stub.ResolveConstraints(reqs[i % len(reqs)])
                lat.append(time.perf_counter() - t)
                i += 1
            return stats(lat, time.perf_counter() - start)
    finally:
        stop_process(proc)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=3.0)
    ap.add_argument("--genres", type=int, default=10_000)
    a = ap.parse_args()
    out: dict = {"ontologies": {}}
    with tempfile.TemporaryDirectory() as tmp:
        import yaml

        big = Path(tmp) / "big.yaml"
        big.write_text(yaml.safe_dump(generate(a.genres), sort_keys=False))
        for name, path in (("sample_100", SAMPLE), (f"generated_{a.genres}", big)):
            t = time.perf_counter()
            onto = load_file(path)
            load_s = time.perf_counter() - t
            svc = OntologyServicer(EmbeddedBackend(path), onto, cache_size=100_000)
            reqs = requests(onto, 500)
            res = {"load_seconds": load_s, "genres": sum(n.kind == pb.NODE_KIND_GENRE for n in onto.nodes.values())}
            for cached in (True, False):
                key = "cached" if cached else "uncached"
                res[f"in_process_{key}"] = in_process(svc, reqs, cached, a.seconds)
                res[f"grpc_{key}"] = over_grpc(path, reqs, cached, a.seconds)
                print(name, key, res[f"in_process_{key}"], res[f"grpc_{key}"])
            out["ontologies"][name] = res
    print("wrote", write_json("bench_ontology", out))
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4))
    labels, p50, p99 = [], [], []
    for name, res in out["ontologies"].items():
        for k in ("in_process_cached", "in_process_uncached", "grpc_cached", "grpc_uncached"):
            labels.append(f"{name}\n{k}")
            p50.append(res[k]["p50_ms"])
            p99.append(res[k]["p99_ms"])
    x = np.arange(len(labels))
    ax.bar(x - 0.2, p50, 0.4, label="p50")
    ax.bar(x + 0.2, p99, 0.4, label="p99")
    ax.set_xticks(x, labels, rotation=60, ha="right", fontsize=7)
    ax.set(ylabel="ms", yscale="log", title="ResolveConstraints latency")
    ax.legend()
    fig.tight_layout()
    fig.savefig(plot_path("bench_ontology"))


if __name__ == "__main__":
    main()
