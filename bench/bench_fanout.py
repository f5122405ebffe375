"""``make bench-fanout``: what one router pays for every shard a miss fans out to, for N = 1 .. 64 shards.

One catalogue (``--items`` x ``--dim``, exact backend) is split N ways by the even slot map, so the shards
shrink as N grows and their own search work stays small. Shards are packed ``--per-process`` to a process,
in one of two layouts (``--layouts``, each measured for every N, side by side, the first one reported):
  logical  one shard server per process serving ``--per-process`` logical shards from one store
           (``GMCO_SHARD_SHARD_IDS=a-b``); the router lists each logical shard at its process and, finding
           them at the same replicas, sends one Search per process for all of them (gmco_router.fanout)
  servers  ``--per-process`` complete shard servers in one host process (``bench_fanout.py host ...``,
           ``gmco_shard.app.start`` each on its own port, each its own store and slots): one Search per shard
Ontology, rl_state and cache run once; one router per N and layout is started against the N shards and
driven directly (no Envoy) by this process over gRPC, every request a miss (``skip_cache``) for one of
``--users`` users that were given state first (a Recommend and a positive feedback each). Every reply's
items must name the shard that the slot map gives them, and none may be degraded.

Per N and layout, in this order:
  idle   ``--idle-seconds`` without requests: the router's background CPU (health checks of every shard)
  fixed  open loop at ``--rate`` req/s, ``--repeats`` windows of ``--seconds``: router CPU per miss (the
         router process's utime+stime from /proc/<pid>/stat over the window, divided by the replies; the
         background CPU is included, not subtracted), client-side miss latency, the router's own
         ``shard_search`` stage timing from each reply
  sat    closed loop with ``--concurrency`` callers, one window: replies/s, CPU per miss, latencies
Per N, once: ``floor``, this process alone sends one prebuilt Search to every shard process with bare
grpc.aio calls and nothing else: its own CPU per call, the floor under any Python router's cost per call
(median of 3). The marginal router CPU per added shard is the least-squares slope of the fixed-rate CPU per
miss over N. ``--smoke`` is the quick N = 1, 2 run of ``make test``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import math
import os
import random
import resource
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

CLK_TCK = os.sysconf("SC_CLK_TCK")
SHARD_SERVICE = "gmco.shard.v1.ShardService"
ROUTER_SERVICE = "gmco.router.v1.RecommendationService"


# -- the shard host: several shard servers in one process ------------------------------------------------

async def _host(assignments: list[tuple[int, int]]) -> None:
    from gmco_common.config import load_settings
    from gmco_shard.app import start
    from gmco_shard.config import PREFIX, Settings

    base = load_settings(Settings, PREFIX)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    async with contextlib.AsyncExitStack() as stack:
        for shard_id, port in assignments:
            await start(dataclasses.replace(base, shard_id=shard_id, port=port), stack)
        await stop.wait()


def host_main(spec: str) -> None:
    from gmco_common.logging import configure_logging

    configure_logging("shard", os.environ.get("GMCO_SHARD_LOG_LEVEL", "WARNING"), "json")
    asyncio.run(_host([(int(s), int(p)) for s, p in (part.split(":") for part in spec.split(","))]))


# -- processes -------------------------------------------------------------------------------------------

def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK  # utime + stime


@dataclasses.dataclass
class Proc:
    name: str
    popen: subprocess.Popen[bytes]
    target: str

    def stop(self) -> None:
        from gmco_testing.procs import stop_process

        stop_process(self.popen, 10)


def spawn(name: str, argv: list[str], env: dict[str, str], port: int, service: str, logs: Path,
          timeout: float = 300) -> Proc:
    from gmco_testing.procs import wait_grpc_serving

    logs.mkdir(parents=True, exist_ok=True)
    with open(logs / f"{name}.log", "ab") as out:
        popen = subprocess.Popen(argv, env=env, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                 cwd=ROOT, start_new_session=True)
    target = f"127.0.0.1:{port}"
    try:
        wait_grpc_serving(target, timeout=timeout, proc=popen, service=service)
    except (TimeoutError, RuntimeError):
        popen.kill()
        raise RuntimeError(f"{name} did not start; see {logs / (name + '.log')}") from None
    return Proc(name, popen, target)


def source_path() -> str:
    """This checkout's package sources, ahead of whatever the environment's editable installs point at
    (so that every child runs the code being measured, even should the shared venv be re-pointed)."""
    return os.pathsep.join(str(p) for p in sorted([*ROOT.glob("libs/*/src"), *ROOT.glob("services/*/src")]))


def base_env(prefix: str, **values: object) -> dict[str, str]:
    env = {**os.environ, f"{prefix}LOG_LEVEL": "WARNING", "PYTHONPATH": source_path()}
    env.update({f"{prefix}{k.upper()}": str(v) for k, v in values.items()})
    return env


class Services:
    """Ontology, rl_state and cache, started once for the whole run."""

    def __init__(self, args: argparse.Namespace, run: Path) -> None:
        from gmco_testing.procs import free_port

        py = sys.executable
        logs = run / "logs"
        self.procs: list[Proc] = []
        ports = {name: free_port() for name in ("ontology", "rl_state", "cache")}
        self.procs.append(spawn("ontology", [py, "-m", "gmco_ontology"],
                                base_env("GMCO_ONTOLOGY_", port=ports["ontology"]), ports["ontology"],
                                "gmco.ontology.v1.OntologyService", logs))
        db = run / f"rl_state-{os.getpid()}.sqlite3"
        self.procs.append(spawn("rl_state", [py, "-m", "gmco_rl_state"],
                                base_env("GMCO_RL_STATE_", port=ports["rl_state"], media_dim=args.dim,
                                         sqlite_path=db), ports["rl_state"], "gmco.rl_state.v1.RLStateService",
                                logs))
        self.procs.append(spawn("cache", [py, "-m", "gmco_cache"], base_env("GMCO_CACHE_", port=ports["cache"]),
                                ports["cache"], "gmco.cache.v1.CacheService", logs))
        self.targets = {p.name: p.target for p in self.procs}
        self.db = db

    def stop(self) -> None:
        for p in reversed(self.procs):
            p.stop()
        for suffix in ("", "-wal", "-shm"):
            Path(f"{self.db}{suffix}").unlink(missing_ok=True)


LAYOUTS = ("logical", "servers")


def start_shards(n: int, per_process: int, layout: str, args: argparse.Namespace, data_dir: Path, run: Path
                 ) -> tuple[list[Proc], str]:
    """N shards, ``per_process`` to a process in ``layout``; returns the processes and the router's
    GMCO_ROUTER_SHARDS (every logical shard listed at the process that serves it)."""
    from gmco_testing.procs import free_port, grpc_serving, wait_until

    env = base_env("GMCO_SHARD_", shard_count=n, dim=args.dim, index_backend="exact", data_dir=data_dir,
                   snapshot_interval_seconds=0, metrics_port=0)
    hosts: list[Proc] = []
    if layout == "logical":
        at: list[int] = []
        for first in range(0, n, per_process):
            last = min(n, first + per_process) - 1
            port = free_port()
            hosts.append(spawn(f"shards-{layout}-{n}-{first}", [sys.executable, "-m", "gmco_shard"],
                               {**env, "GMCO_SHARD_PORT": str(port), "GMCO_SHARD_SHARD_IDS": f"{first}-{last}"},
                               port, SHARD_SERVICE, run / "logs"))
            at.extend([port] * (last - first + 1))
        return hosts, ",".join(f"{i}=127.0.0.1:{p}" for i, p in enumerate(at))
    ports = [free_port() for _ in range(n)]
    for first in range(0, n, per_process):
        ids = range(first, min(n, first + per_process))
        spec = ",".join(f"{i}:{ports[i]}" for i in ids)
        hosts.append(spawn(f"shards-{layout}-{n}-{first}", [sys.executable, str(Path(__file__).resolve()), "host",
                                                            spec], env, ports[ids[-1]], SHARD_SERVICE, run / "logs"))
    for i in range(n):  # the host answers on its last port once all of its shards are serving; check all
        wait_until(lambda t=f"127.0.0.1:{ports[i]}": grpc_serving(t, SHARD_SERVICE), 60, f"shard {i}")
    return hosts, ",".join(f"{i}=127.0.0.1:{p}" for i, p in enumerate(ports))


def start_router(name: str, shards: str, services: Services, args: argparse.Namespace, run: Path) -> Proc:
    from gmco_testing.procs import free_port

    port = free_port()
    env = base_env("GMCO_ROUTER_", port=port, shards=shards, cache_target=services.targets["cache"],
                   ontology_target=services.targets["ontology"], rl_state_target=services.targets["rl_state"],
                   media_dim=args.dim, metrics_port=0, instance_id=name)
    env.pop("GMCO_ROUTER_CATALOG_DSN", None)
    return spawn(name, [sys.executable, "-m", "gmco_router"], env, port, ROUTER_SERVICE, run / "logs")


# -- load ------------------------------------------------------------------------------------------------

@dataclasses.dataclass
class Window:
    wall: float
    replies: int
    errors: int
    degraded: int
    cpu_seconds: float
    miss_ms: list[float]
    shard_ms: list[float]
    codes: dict[str, int] = dataclasses.field(default_factory=dict)
    wrong_shard: int = 0  # reply items whose shard_id is not the slot map's

    @property
    def cpu_ms_per_miss(self) -> float:
        return 1e3 * self.cpu_seconds / max(1, self.replies)


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    s = sorted(values)
    return s[min(len(s) - 1, int(q * len(s)))]


class Driver:
    def __init__(self, target: str, users: list[str], k: int, shards: int = 0) -> None:
        import grpc
        from gmco.router.v1 import router_service_pb2_grpc
        from gmco_common.slots import SlotMap

        self.channel = grpc.aio.insecure_channel(target)
        self.stub = router_service_pb2_grpc.RecommendationServiceStub(self.channel)
        self.users = users
        self.k = k
        self.slot_map = SlotMap.even(shards) if shards else None

    async def close(self) -> None:
        await self.channel.close()

    async def one(self, w: Window, user: str | None = None, skip_cache: bool = True) -> Any:
        import grpc
        from gmco.router.v1 import router_service_pb2 as pb

        user = user or random.choice(self.users)
        start = time.perf_counter()
        try:
            resp = await self.stub.Recommend(pb.RecommendRequest(user_id=user, k=self.k, skip_cache=skip_cache),
                                             timeout=10)
        except grpc.aio.AioRpcError as exc:
            w.errors += 1
            w.codes[exc.code().name] = w.codes.get(exc.code().name, 0) + 1
            return None
        w.miss_ms.append(1e3 * (time.perf_counter() - start))
        w.replies += 1
        w.degraded += resp.degraded
        if self.slot_map is not None and resp.items:
            named = [i.shard_id for i in resp.items]
            w.wrong_shard += int((self.slot_map.shards_of([i.media_id for i in resp.items]) != named).sum())
        w.shard_ms.extend(1e3 * t.seconds for t in resp.timings if t.stage == "shard_search")
        return resp

    async def seed(self) -> None:
        """Give every user state: one Recommend, then a positive feedback on its first item."""
        from gmco.rl_state.v1 import rl_state_service_pb2 as rlpb
        from gmco.router.v1 import router_service_pb2 as pb

        async def seed_one(user: str) -> None:
            resp = await self.one(Window(0, 0, 0, 0, 0, [], []), user)
            if resp is None or not resp.items:
                raise RuntimeError(f"seeding {user}: no recommendation")
            await self.stub.RecordFeedback(pb.RecordFeedbackRequest(events=[rlpb.FeedbackEvent(
                event_id=f"seed-{user}", user_id=user, media_id=resp.items[0].media_id, reward=1.0,
                timestamp_unix_ms=int(time.time() * 1000))]), metadata=[("x-user-id", user)], timeout=10)

        for i in range(0, len(self.users), 16):
            await asyncio.gather(*(seed_one(u) for u in self.users[i:i + 16]))

    async def open_loop(self, pid: int, rate: float, seconds: float) -> Window:
        """Requests at fixed intervals (a late one is sent at once, never skipped), for ``seconds``."""
        w = Window(0, 0, 0, 0, 0, [], [])
        tasks: set[asyncio.Task[Any]] = set()
        cpu0, start = cpu_seconds(pid), time.perf_counter()
        for i in range(int(rate * seconds)):
            delay = start + i / rate - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            task = asyncio.ensure_future(self.one(w))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
        if tasks:
            await asyncio.gather(*tasks)
        w.wall, w.cpu_seconds = time.perf_counter() - start, cpu_seconds(pid) - cpu0
        return w

    async def closed_loop(self, pid: int, concurrency: int, seconds: float) -> Window:
        w = Window(0, 0, 0, 0, 0, [], [])
        cpu0, start = cpu_seconds(pid), time.perf_counter()
        end = start + seconds

        async def worker() -> None:
            while time.perf_counter() < end:
                await self.one(w)

        await asyncio.gather(*(worker() for _ in range(concurrency)))
        w.wall, w.cpu_seconds = time.perf_counter() - start, cpu_seconds(pid) - cpu0
        return w


def summary(windows: list[Window]) -> dict[str, Any]:
    miss = [x for w in windows for x in w.miss_ms]
    shard = [x for w in windows for x in w.shard_ms]
    return {
        "router_cpu_ms_per_miss": statistics.median(w.cpu_ms_per_miss for w in windows),
        "router_cpu_ms_per_miss_windows": [w.cpu_ms_per_miss for w in windows],
        "replies_per_second": statistics.median(w.replies / w.wall for w in windows),
        "replies": sum(w.replies for w in windows), "errors": sum(w.errors for w in windows),
        "wrong_shard_items": sum(w.wrong_shard for w in windows),
        "error_codes": {c: sum(w.codes.get(c, 0) for w in windows) for c in {c for w in windows for c in w.codes}},
        "degraded": sum(w.degraded for w in windows),
        "miss_p50_ms": pct(miss, 0.5), "miss_p99_ms": pct(miss, 0.99),
        "shard_stage_p50_ms": pct(shard, 0.5), "shard_stage_p99_ms": pct(shard, 0.99),
    }


def py_spy(pid: int, seconds: float, out: Path) -> subprocess.Popen[bytes]:
    """py-spy sampling the router (raw collapsed stacks) for ``seconds``, without pausing it."""
    out.parent.mkdir(parents=True, exist_ok=True)
    return subprocess.Popen(["py-spy", "record", "--pid", str(pid), "--duration", str(int(seconds)), "--rate", "250",
                             "--nonblocking", "--format", "raw", "--output", str(out)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


async def measure(router: Proc, users: list[str], shards: int, args: argparse.Namespace,
                  profile: Path | None = None) -> dict[str, Any]:
    pid = router.popen.pid
    driver = Driver(router.target, users, args.k, shards)
    try:
        warm = Window(0, 0, 0, 0, 0, [], [])
        for u in users:  # the router learns each user's version; then a short warm-up at the fixed rate
            await driver.one(warm, u)
        await driver.open_loop(pid, args.rate, args.warmup_seconds)
        cpu0 = cpu_seconds(pid)
        await asyncio.sleep(args.idle_seconds)
        idle = 1e3 * (cpu_seconds(pid) - cpu0) / args.idle_seconds
        spy = py_spy(pid, args.seconds * args.repeats, profile) if profile is not None else None
        fixed = [await driver.open_loop(pid, args.rate, args.seconds) for _ in range(args.repeats)]
        if spy is not None:
            spy.wait(30)
        sat = [await driver.closed_loop(pid, args.concurrency, args.seconds) for _ in range(args.sat_repeats)]
    finally:
        await driver.close()
    return {"router_idle_cpu_ms_per_second": idle, "fixed_rate": summary(fixed), "saturation": summary(sat)}


def self_cpu_seconds() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


async def grpc_floor(spec: str, dim: int, rounds: int) -> float:
    """Client CPU (this process) per Search call when one prebuilt request goes to every shard with bare
    grpc.aio calls and nothing else: the floor under what the router can pay per shard in Python."""
    import grpc
    import numpy as np
    from gmco.shard.v1 import shard_service_pb2 as spb
    from gmco_common.channels import retry_service_config
    from gmco_common.vectors import encode_batch

    options = [("grpc.enable_retries", 1), ("grpc.service_config", retry_service_config(2, True)),
               ("grpc.max_receive_message_length", 64 << 20)]
    targets = dict.fromkeys(part.split("=", 1)[1] for part in spec.split(","))  # one call per process
    channels = [grpc.aio.insecure_channel(t, options=options) for t in targets]
    calls = [c.unary_unary("/gmco.shard.v1.ShardService/Search", request_serializer=None,
                           response_deserializer=spb.SearchResponse.FromString) for c in channels]
    query = np.random.default_rng(1).standard_normal((1, dim)).astype(np.float32)
    payload = spb.SearchRequest(queries=encode_batch(query, "float16"), k=50, include_features=True,
                                columnar=True).SerializeToString()
    try:
        for _ in range(3):
            await asyncio.gather(*(c(payload, timeout=10) for c in calls))
        cpu0 = self_cpu_seconds()
        for _ in range(rounds):
            await asyncio.gather(*(c(payload, timeout=10) for c in calls))
        return 1e3 * (self_cpu_seconds() - cpu0) / (rounds * len(calls))
    finally:
        for c in channels:
            await c.close()


def slope(xs: list[float], ys: list[float]) -> float:
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sum((x - mx) ** 2 for x in xs)


def plot(doc: dict[str, Any], path: Path) -> None:
    import matplotlib.pyplot as plt

    ns = [int(n) for n in doc["per_n"]]
    fig, (a, b, c) = plt.subplots(1, 3, figsize=(15, 4.2))
    for variant, style in zip(doc["layouts"], ("o-", "s--"), strict=False):
        rows = [doc["per_n"][str(n)].get(variant) for n in ns]
        if not all(rows):
            continue
        a.plot(ns, [r["fixed_rate"]["router_cpu_ms_per_miss"] for r in rows], style, label=f"{variant}, fixed rate")
        a.plot(ns, [r["saturation"]["router_cpu_ms_per_miss"] for r in rows], style, alpha=0.5,
               label=f"{variant}, saturation")
        b.plot(ns, [r["fixed_rate"]["shard_stage_p99_ms"] for r in rows], style, label=f"{variant} shard stage p99")
        b.plot(ns, [r["fixed_rate"]["miss_p99_ms"] for r in rows], style, alpha=0.5, label=f"{variant} miss p99")
        c.plot(ns, [r["saturation"]["replies_per_second"] for r in rows], style, label=variant)
    for variant in doc["layouts"]:  # the fitted lines whose slope is the marginal cost
        key = f"marginal_router_cpu_ms_per_shard_{variant}"
        if key in doc:
            ys = [doc["per_n"][str(n)][variant]["fixed_rate"]["router_cpu_ms_per_miss"] for n in ns]
            mid = statistics.fmean(ys) - doc[key] * statistics.fmean(ns)
            a.plot(ns, [mid + doc[key] * n for n in ns], ":", color="grey",
                   label=f"{variant} fit: {doc[key]:.3f} ms/shard")
    for ax, title, unit in ((a, "router CPU per miss", "ms"), (b, f"p99 at {doc['rate']} req/s", "ms"),
                            (c, "replies/s at saturation", "replies/s")):
        if ax is not a:  # CPU on a linear axis: the slope is the marginal cost
            ax.set_xscale("log", base=2)
        ax.set_xlabel("shards (N)")
        ax.set_ylabel(unit)
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(f"router fan-out: marginal CPU {doc['marginal_router_cpu_ms_per_shard']:.3f} ms per added shard")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shards", default="1,2,4,8,16,32,64", help="comma-separated N")
    p.add_argument("--per-process", type=int, default=8, help="shards per process")
    p.add_argument("--layouts", default=",".join(LAYOUTS),
                   help="how shards share a process, measured side by side; the first is reported (logical: "
                        "one server serving several logical shards, one call each; servers: several servers)")
    p.add_argument("--items", type=int, default=16_000)
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--users", type=int, default=200)
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--rate", type=float, default=10.0, help="fixed arrival rate, req/s")
    p.add_argument("--concurrency", type=int, default=8,
                   help="callers in the saturation phase (the router's admission floor is 8: more are shed)")
    p.add_argument("--floor-rounds", type=int, default=40, help="fan-outs per bare-gRPC floor measurement")
    p.add_argument("--seconds", type=float, default=8.0, help="length of one measured window")
    p.add_argument("--repeats", type=int, default=3, help="fixed-rate windows per N (the median is reported)")
    p.add_argument("--sat-repeats", type=int, default=1)
    p.add_argument("--warmup-seconds", type=float, default=3.0)
    p.add_argument("--idle-seconds", type=float, default=3.0)
    p.add_argument("--profile-dir", type=Path, default=None,
                   help="py-spy the router during the fixed-rate windows (raw collapsed stacks) into this directory")
    p.add_argument("--profile-at", default="16,64", help="the N to profile with --profile-dir")
    p.add_argument("--out", default="fanout", help="results name under bench/results/")
    p.add_argument("--smoke", action="store_true", help="N = 1, 2, short windows, small catalogue; no results file")
    args = p.parse_args(argv)
    args.profile_at = {int(n) for n in args.profile_at.split(",")}
    args.layouts = [v.strip() for v in args.layouts.split(",") if v.strip()]
    if not args.layouts or set(args.layouts) - set(LAYOUTS) or len(set(args.layouts)) != len(args.layouts):
        p.error(f"--layouts: one or both of {', '.join(LAYOUTS)}, each once")
    if args.smoke:
        args.shards, args.items, args.dim, args.users = "1,2", 2000, 64, 8
        args.seconds, args.repeats, args.warmup_seconds, args.idle_seconds, args.concurrency = 1.5, 1, 0.5, 0.5, 4
        args.floor_rounds = 5
        args.out = ""
    return args


async def run(args: argparse.Namespace) -> dict[str, Any]:
    from gmco_stack.catalogue import ensure_catalogue

    run_dir = ROOT / ".run" / "fanout"
    data_dir = ROOT / ".run" / "data" / f"catalogue-{args.items}x{args.dim}-s7"
    ensure_catalogue(data_dir, args.items, args.dim, 7)
    ns = [int(n) for n in args.shards.split(",")]
    users = [f"fanout-user-{i}" for i in range(args.users)]
    services = Services(args, run_dir)
    per_n: dict[str, Any] = {}
    seeded = False
    try:
        for n in ns:
            row: dict[str, Any] = {"shards": n, "rows_per_shard": args.items / n}
            for layout in args.layouts:
                hosts, spec = start_shards(n, args.per_process, layout, args, data_dir, run_dir)
                try:
                    router = start_router(f"router-{layout}-{n}", spec, services, args, run_dir)
                    try:
                        if not seeded:
                            driver = Driver(router.target, users, args.k, n)
                            await driver.seed()
                            await driver.close()
                            seeded = True
                        profile = (args.profile_dir / f"router-{layout}-{n}.txt"
                                   if args.profile_dir is not None and n in args.profile_at else None)
                        row[layout] = await measure(router, users, n, args, profile)
                    finally:
                        router.stop()
                    row[layout]["shard_processes"] = len(hosts)
                    row[layout]["calls_per_miss"] = len({part.split("=", 1)[1] for part in spec.split(",")})
                    f = row[layout]["fixed_rate"]
                    print(f"N={n:3d} {layout:8s} CPU/miss {f['router_cpu_ms_per_miss']:7.2f} ms (fixed) "
                          f"{row[layout]['saturation']['router_cpu_ms_per_miss']:7.2f} ms (sat); shard stage "
                          f"p50/p99 {f['shard_stage_p50_ms']:.1f}/{f['shard_stage_p99_ms']:.1f} ms; miss p99 "
                          f"{f['miss_p99_ms']:.1f} ms; sat {row[layout]['saturation']['replies_per_second']:.1f}"
                          f" replies/s; {row[layout]['calls_per_miss']} calls/miss", flush=True)
                    if "grpc_floor_cpu_ms_per_call" not in row:
                        row["grpc_floor_cpu_ms_per_call"] = statistics.median(
                            [await grpc_floor(spec, args.dim, args.floor_rounds) for _ in range(3)])
                        print(f"N={n:3d} floor    bare grpc.aio Search: {row['grpc_floor_cpu_ms_per_call']:.3f} ms "
                              "client CPU per call", flush=True)
                finally:
                    for h in hosts:
                        h.stop()
            per_n[str(n)] = row
    finally:
        services.stop()
    doc: dict[str, Any] = {"rate": args.rate, "concurrency": args.concurrency, "items": args.items, "dim": args.dim,
                           "per_process": args.per_process, "layouts": args.layouts, "k": args.k,
                           "seconds": args.seconds, "repeats": args.repeats, "index_backend": "exact"}
    for layout in args.layouts:
        if len(ns) > 1:
            doc[f"marginal_router_cpu_ms_per_shard_{layout}"] = slope(
                [float(n) for n in ns], [per_n[str(n)][layout]["fixed_rate"]["router_cpu_ms_per_miss"] for n in ns])
    doc["marginal_router_cpu_ms_per_shard"] = doc.get(f"marginal_router_cpu_ms_per_shard_{args.layouts[0]}", math.nan)
    doc["grpc_floor_cpu_ms_per_call_median"] = statistics.median(r["grpc_floor_cpu_ms_per_call"] for r in per_n.values())
    if len(args.layouts) == 2 and len(ns) > 1:
        a, b = args.layouts
        # A slope can be 0 (or negative) when the CPU per miss moves less than a clock tick over N (the
        # smoke run): then there is no ratio to give.
        if doc[f"marginal_router_cpu_ms_per_shard_{b}"] > 0:
            doc[f"marginal_ratio_{a}_to_{b}"] = (doc[f"marginal_router_cpu_ms_per_shard_{a}"]
                                                 / doc[f"marginal_router_cpu_ms_per_shard_{b}"])
    for n, row in per_n.items():  # the keys the issue names, flat per N (the reported layout, fixed rate)
        cur = row[args.layouts[0]]
        row.update(router_cpu_ms_per_miss=cur["fixed_rate"]["router_cpu_ms_per_miss"],
                   router_cpu_ms_per_miss_saturated=cur["saturation"]["router_cpu_ms_per_miss"],
                   shard_stage_p50_ms=cur["fixed_rate"]["shard_stage_p50_ms"],
                   shard_stage_p99_ms=cur["fixed_rate"]["shard_stage_p99_ms"],
                   miss_p50_ms=cur["fixed_rate"]["miss_p50_ms"], miss_p99_ms=cur["fixed_rate"]["miss_p99_ms"],
                   replies_per_second=cur["saturation"]["replies_per_second"],
                   shard_processes=cur["shard_processes"], calls_per_miss=cur["calls_per_miss"])
        if len(args.layouts) == 2 and row[args.layouts[1]]["fixed_rate"]["router_cpu_ms_per_miss"] > 0:
            other = row[args.layouts[1]]
            row[f"cpu_ratio_{args.layouts[0]}_to_{args.layouts[1]}"] = (
                cur["fixed_rate"]["router_cpu_ms_per_miss"] / other["fixed_rate"]["router_cpu_ms_per_miss"])
        per_n[n] = row
    doc["per_n"] = per_n
    return doc


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["host"]:
        host_main(argv[1])
        return 0
    if argv[:1] == ["plot"]:  # redraw a results file's PNG: bench_fanout.py plot <name>
        import json

        from common import RESULTS, plot_path

        plot(json.loads((RESULTS / f"{argv[1]}.json").read_text()), plot_path(argv[1]))
        return 0
    args = parse_args(argv)
    doc = asyncio.run(run(args))
    # Below saturation nothing may fail; at saturation the router's admission limit may shed
    # (RESOURCE_EXHAUSTED, reported in error_codes), but no answer may be degraded.
    bad = [n for n, r in doc["per_n"].items() for v in doc["layouts"]
           for phase in ("fixed_rate", "saturation") if r[v][phase]["degraded"] or r[v][phase]["wrong_shard_items"]
           or (phase == "fixed_rate" and r[v][phase]["errors"])]
    print(f"marginal router CPU per added shard: {doc['marginal_router_cpu_ms_per_shard']:.3f} ms "
          f"({doc['layouts'][0]})" + "".join(f"; {v} {doc[f'marginal_router_cpu_ms_per_shard_{v}']:.3f} ms"
                                             for v in doc["layouts"][1:]
                                             if f"marginal_router_cpu_ms_per_shard_{v}" in doc))
    if args.out:
        from common import plot_path, write_json

        path = write_json(args.out, doc)
        plot(doc, plot_path(args.out))
        print(f"wrote {path}")
    if bad:
        print(f"errors, degraded replies or items naming the wrong shard at N = {sorted(set(bad))}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
