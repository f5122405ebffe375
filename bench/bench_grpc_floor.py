"""The floor under the shard's batch-1 gRPC figure: what one Python grpc.aio round trip costs here.

Three servers, each a separate process answering ShardService.Search with a canned reply of k = 10
items (so the search itself costs nothing), called one at a time by a grpc.aio client:
  bare       grpc.aio.server() with the servicer, nothing else
  gmco       gmco_common.server.start_server: tracing, metrics and error interceptors, health,
             reflection (what every service runs)
  gmco+hop   the same, with the reply computed in a worker thread (asyncio.to_thread), as the shard
             does around its index search
Reports the median milliseconds per call of 3 runs each, and the batch-1 gRPC/in-process ratio the
floor allows for a search of a given cost: t / (t + floor).

Then gRPC's core settings (``experiments``): the gmco server and a client, each its own process, once
with gRPC's own defaults (GRPC_EXPERIMENTS empty) and once with what every service sets
(gmco_common.grpc_defaults), alternating, 3 runs each: CPU and thread switches (voluntary and not, all
threads, from /proc) per call on each side, and ms per call.
Then what ``start_server``'s per-call wrapping costs under load (``overhead``): the bare and the gmco
server, each its own process, each called by a client process with 32 calls in flight, alternating, 3 runs
each: the server's CPU per call and its difference. Run it with PYTHONPATH naming another checkout's
``libs/common/src`` to measure that version's servers side by side with this one's.
Writes bench/results/bench_grpc_floor.{json,png}.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
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


def _request() -> pb.SearchRequest:
    query = np.random.default_rng(0).standard_normal((1, DIM)).astype(np.float32)
    return pb.SearchRequest(queries=encode_batch(query), k=K)


async def _calls_for(stub: pb_grpc.ShardServiceStub, request: pb.SearchRequest, seconds: float) -> tuple[int, float]:
    """Calls made one at a time for ``seconds``, and the seconds they took."""
    calls, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        await stub.Search(request)
        calls += 1
    return calls, time.perf_counter() - start


async def per_call_ms(port: int, seconds: float) -> list[float]:
    request = _request()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = pb_grpc.ShardServiceStub(channel)
        for _ in range(100):
            await stub.Search(request)
        runs = []
        for _ in range(3):
            calls, wall = await _calls_for(stub, request, seconds)
            runs.append(wall / calls * 1e3)
        return runs


def usage(pid: int) -> tuple[float, int]:
    """CPU seconds and context switches of every thread of ``pid`` so far."""
    cpu, switches = 0.0, 0
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            stat = Path(f"/proc/{pid}/task/{tid}/stat").read_text().rsplit(")", 1)[1].split()
            status = Path(f"/proc/{pid}/task/{tid}/status").read_text().splitlines()
        except OSError:
            continue
        cpu += (int(stat[11]) + int(stat[12])) / os.sysconf("SC_CLK_TCK")
        switches += sum(int(line.split()[1]) for line in status if "ctxt_switches" in line)
    return cpu, switches


async def client_usage(port: int, seconds: float, server_pid: int, in_flight: int = 1) -> dict:
    """``in_flight`` callers, each one call at a time, for ``seconds``: per call, this process's and the
    server's CPU ms and switches."""
    request = _request()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = pb_grpc.ShardServiceStub(channel)
        for _ in range(200):
            await stub.Search(request)
        mine, theirs = usage(os.getpid()), usage(server_pid)
        start = time.perf_counter()
        done = await asyncio.gather(*(_calls_for(stub, request, seconds) for _ in range(in_flight)))
        calls, wall = sum(c for c, _ in done), (time.perf_counter() - start) * in_flight
        mine2, theirs2 = usage(os.getpid()), usage(server_pid)
    return {"ms_per_call": wall / calls * 1e3,
            "client_cpu_ms_per_call": (mine2[0] - mine[0]) / calls * 1e3,
            "client_switches_per_call": (mine2[1] - mine[1]) / calls,
            "server_cpu_ms_per_call": (theirs2[0] - theirs[0]) / calls * 1e3,
            "server_switches_per_call": (theirs2[1] - theirs[1]) / calls}


def _client_run(mode: str, env: dict[str, str], seconds: float, in_flight: int = 1) -> dict:
    """A ``mode`` server and a client, each its own process with ``env``: what :func:`client_usage` measured."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, __file__, "--serve", mode, str(port)], env=env)
    try:
        wait_grpc_serving(f"127.0.0.1:{port}", 60, proc, SERVICE)
        done = subprocess.run([sys.executable, __file__, "--client", str(port), str(seconds), str(proc.pid),
                               str(in_flight)], env=env, check=True, capture_output=True, text=True)
    finally:
        stop_process(proc)
    return json.loads(done.stdout)


def overhead(seconds: float, in_flight: int = 32) -> dict:
    """Server CPU per call of the bare server and of start_server's, under ``in_flight`` concurrent calls,
    both with the services' gRPC core settings."""
    from gmco_common.grpc_defaults import EXPERIMENTS

    env = {**os.environ, "GRPC_EXPERIMENTS": EXPERIMENTS}
    runs: dict[str, list[dict]] = {"bare": [], "gmco": []}
    for _ in range(3):
        for mode, got in runs.items():
            got.append(_client_run(mode, env, seconds, in_flight))
    med = {mode: statistics.median(r["server_cpu_ms_per_call"] for r in rs) for mode, rs in runs.items()}
    out = {"in_flight": in_flight, "runs": runs, "server_cpu_ms_per_call_median": med,
           "wrapping_cpu_ms_per_call": med["gmco"] - med["bare"]}
    print(f"overhead, {in_flight} in flight: server CPU per call bare {med['bare']:.3f} ms, gmco {med['gmco']:.3f} ms "
          f"(+{(med['gmco'] - med['bare']) * 1e3:.0f} us)")
    return out


def experiments(seconds: float) -> dict:
    """gRPC's defaults against gmco_common.grpc_defaults, server and client each in its own process."""
    from gmco_common.grpc_defaults import EXPERIMENTS

    settings = {"grpc_defaults": "", "gmco_default": EXPERIMENTS}
    runs: dict[str, list[dict]] = {name: [] for name in settings}
    for _ in range(3):
        for name, value in settings.items():
            runs[name].append(_client_run("gmco", {**os.environ, "GRPC_EXPERIMENTS": value}, seconds))
    out = {}
    for name, value in settings.items():
        keys = runs[name][0].keys()
        out[name] = {"GRPC_EXPERIMENTS": value, "runs": runs[name],
                     "median": {k: statistics.median(r[k] for r in runs[name]) for k in keys}}
        m = out[name]["median"]
        print(f"{name} ({value or 'empty'}): {m['ms_per_call']:.3f} ms per call; server "
              f"{m['server_cpu_ms_per_call']:.3f} ms CPU, {m['server_switches_per_call']:.1f} switches; client "
              f"{m['client_cpu_ms_per_call']:.3f} ms CPU, {m['client_switches_per_call']:.1f} switches per call")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=3.0, help="length of each timed run (3 runs, median)")
    ap.add_argument("--serve", nargs=2, metavar=("MODE", "PORT"), help=argparse.SUPPRESS)
    ap.add_argument("--client", nargs="+", metavar="PORT SECONDS SERVER_PID [IN_FLIGHT]", help=argparse.SUPPRESS)
    ap.add_argument("--overhead-only", action="store_true",
                    help="only the bare-vs-gmco server CPU per call under load; prints, writes nothing")
    a = ap.parse_args()
    if a.serve:
        asyncio.run(serve(a.serve[0], int(a.serve[1])))
        return
    if a.client:
        port, seconds, pid, *rest = a.client
        print(json.dumps(asyncio.run(client_usage(int(port), float(seconds), int(pid), int(rest[0]) if rest else 1))))
        return
    if a.overhead_only:
        overhead(a.seconds)
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
    out["experiments"] = experiments(a.seconds)
    out["overhead"] = overhead(a.seconds)
    print("wrote", write_json("bench_grpc_floor", out))

    import matplotlib.pyplot as plt

    fig, (ax, rx, ex) = plt.subplots(1, 3, figsize=(15, 3.5))
    ax.bar(list(MODES), [out["modes"][m]["ms_per_call_median"] for m in MODES])
    ax.set(ylabel="ms per call (median of 3 runs)", title="Python grpc.aio round trip, canned reply")
    cost = np.linspace(0.1, 5, 100)
    rx.plot(cost, cost / (cost + floor), label=f"floor {floor:.2f} ms (gmco+hop)")
    rx.axhline(0.5, ls="--", c="grey", label="target 0.5")
    rx.set(xlabel="in-process search cost, ms", ylabel="best gRPC/in-process ratio, batch 1",
           title="what the floor allows")
    rx.legend()
    names = list(out["experiments"])
    medians = [out["experiments"][n]["median"] for n in names]
    x = np.arange(4)
    for i, (name, m) in enumerate(zip(names, medians, strict=True)):
        ex.bar(x + i * 0.4, [m["server_cpu_ms_per_call"], m["client_cpu_ms_per_call"],
                             m["server_switches_per_call"] / 10, m["client_switches_per_call"] / 10], 0.4, label=name)
    ex.set_xticks(x + 0.2, ["server CPU ms", "client CPU ms", "server switches/10", "client switches/10"])
    ex.set(title="per call: GRPC_EXPERIMENTS empty vs gmco default")
    ex.legend()
    fig.tight_layout()
    fig.savefig(plot_path("bench_grpc_floor"))


if __name__ == "__main__":
    main()
