"""The floor under the shard's batch-1 gRPC figure: what one Python grpc.aio round trip costs here.

Three servers, each a separate process answering ShardService.Search with a canned reply of k = 10
items (so the search itself costs nothing), called one at a time by a grpc.aio client:
  bare       grpc.aio.server() with the servicer, nothing else
  gmco       gmco_common.server.start_server: tracing, metrics and error interceptors, health,
             reflection (what every service runs)
  gmco+hop   the same, with the reply computed in a worker thread (asyncio.to_thread), as the shard
             does around its index search
Reports the median milliseconds per call of 3 runs each, and the batch-1 gRPC/in-process ratio the
floor allows for a search of a given cost: t / (t + floor). Writes bench/results/bench_grpc_floor.{json,png}.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import subprocess
import sys
import time
from pathlib import Path

import grpc
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import plot_path, write_json
from gmco.shard.v1 import shard_service_pb2 as pb
from gmco.shard.v1 import shard_service_pb2_grpc as pb_grpc
from gmco_common.vectors import encode_batch
from gmco_testing.procs import free_port, stop_process, wait_grpc_serving

SERVICE = "gmco.shard.v1.ShardService"
MODES = ("bare", "gmco", "gmco+hop")
DIM = 1024
K = 10


def _reply() -> pb.SearchResponse:
    out = pb.SearchResponse(shard_id=0, applied_lsn=1, allowed_count=100_000)
    items = out.results.add().items
    for i in range(K):
        items.add(media_id=1000 + i, score=1.0 - i / 100, shard_id=0)
    return out


class Canned(pb_grpc.ShardServiceServicer):
    def __init__(self, hop: bool) -> None:
        self._reply, self._hop = _reply(), hop

    async def Search(self, request: pb.SearchRequest, context: grpc.aio.ServicerContext) -> pb.SearchResponse:
        if self._hop:
            return await asyncio.to_thread(lambda: self._reply)
        return self._reply


async def serve(mode: str, port: int) -> None:
    servicer = Canned(hop=mode == "gmco+hop")
    if mode == "bare":
        from grpc_health.v1 import health, health_pb2, health_pb2_grpc

        server = grpc.aio.server()
        pb_grpc.add_ShardServiceServicer_to_server(servicer, server)
        checker = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(checker, server)
        await checker.set(SERVICE, health_pb2.HealthCheckResponse.SERVING)
        server.add_insecure_port(f"127.0.0.1:{port}")
        await server.start()
        await server.wait_for_termination()
        return
    from gmco_common.config import ServerSettings
    from gmco_common.server import Registration, start_server

    running = await start_server(ServerSettings(port=port, metrics_port=0),
                                 [Registration(pb_grpc.add_ShardServiceServicer_to_server, servicer, SERVICE)])
    await running.set_serving(True)
    await running.server.wait_for_termination()


async def per_call_ms(port: int, seconds: float) -> list[float]:
    query = np.random.default_rng(0).standard_normal((1, DIM)).astype(np.float32)
    request = pb.SearchRequest(queries=encode_batch(query), k=K)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = pb_grpc.ShardServiceStub(channel)
        for _ in range(100):
            await stub.Search(request)
        runs = []
        for _ in range(3):
            calls, start = 0, time.perf_counter()
            while time.perf_counter() - start < seconds:
                await stub.Search(request)
                calls += 1
            runs.append((time.perf_counter() - start) / calls * 1e3)
        return runs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=3.0, help="length of each timed run (3 runs, median)")
    ap.add_argument("--serve", nargs=2, metavar=("MODE", "PORT"), help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.serve:
        asyncio.run(serve(a.serve[0], int(a.serve[1])))
        return
    out: dict = {"k": K, "dim": DIM, "modes": {}}
    for mode in MODES:
        port = free_port()
        proc = subprocess.Popen([sys.executable, __file__, "--serve", mode, str(port)])
        try:
            wait_grpc_serving(f"127.0.0.1:{port}", 60, proc, SERVICE)
            runs = asyncio.run(per_call_ms(port, a.seconds))
        finally:
            stop_process(proc)
        out["modes"][mode] = {"ms_per_call_runs": runs, "ms_per_call_median": statistics.median(runs)}
        print(f"{mode}: {statistics.median(runs):.3f} ms per call (runs {[round(r, 3) for r in runs]})")
    floor = out["modes"]["gmco+hop"]["ms_per_call_median"]
    out["best_b1_ratio_for_search_ms"] = {str(t): t / (t + floor) for t in (0.25, 0.5, 1.0, 2.0, 4.0)}
    print("best batch-1 gRPC/in-process ratio by search cost (ms):", out["best_b1_ratio_for_search_ms"])
    print("wrote", write_json("bench_grpc_floor", out))

    import matplotlib.pyplot as plt

    fig, (ax, rx) = plt.subplots(1, 2, figsize=(10, 3.5))
    ax.bar(list(MODES), [out["modes"][m]["ms_per_call_median"] for m in MODES])
    ax.set(ylabel="ms per call (median of 3 runs)", title="Python grpc.aio round trip, canned reply")
    cost = np.linspace(0.1, 5, 100)
    rx.plot(cost, cost / (cost + floor), label=f"floor {floor:.2f} ms (gmco+hop)")
    rx.axhline(0.5, ls="--", c="grey", label="target 0.5")
    rx.set(xlabel="in-process search cost, ms", ylabel="best gRPC/in-process ratio, batch 1",
           title="what the floor allows")
    rx.legend()
    fig.tight_layout()
    fig.savefig(plot_path("bench_grpc_floor"))


if __name__ == "__main__":
    main()
