"""Capacity planning from this project's measured figures (``gmco plan``; docs/capacity.md).

Every figure the plan uses says where it comes from: a key of a results file under ``bench/results/``
(measured on the machine named in that file), the cache model below, or an assumption stated with its
value. Nothing measured is hard-coded here; the files are read at planning time.

The arithmetic, for a peak of P requests/s:

- hit ratio h: given (measured), or :func:`model_hit_ratio` of (P, users, Zipf exponent, TTL, feedback);
- misses M = P (1 - h); every miss searches one replica of every shard, so each shard sees M queries/s;
- shards S = ceil(items / rows per shard), rows per shard being the profile's measured shard size;
- replicas per shard R = max(requested, ceil(M / (replica QPS x utilisation)));
- router CPU per miss = base + per-shard x S (the fit of bench/results/fanout.json, one call per shard:
  a planned shard is one process; several logical shards in one process would cost one call), per hit the
  router's measured CPU per hit; routers = ceil((M x miss CPU + (P - M) x hit CPU) / (cores per router x
  utilisation));
- cache lookups P/s plus M puts/s go to the cache service and Redis; live lists ~= min(users, M x TTL)
  (Little's law: each miss writes one list that lives TTL seconds);
- memory per shard = rows per shard x bytes per row (the profile's measured resident bytes per row when
  there is one, else the raw FP16 row and its columns, marked not measured).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

# Assumptions the measured files do not cover; each is printed with the plan when it is used.
REDIS_CLUSTER_MIN_MASTERS = 3  # a Redis Cluster needs at least three masters
LIST_ENTRY_OVERHEAD_BYTES = 150  # key, TTL and Redis per-entry overhead of one cached list (not measured)
LIST_ITEM_BYTES = 30  # one ScoredItem in a cached list (id, score, propensity, flags; not measured)
COLUMN_BYTES_PER_ROW = 48  # attribute columns beside each FP16 row (ids, genres, masks, year, popularity)


def model_hit_ratio(rate: float, users: int, zipf_s: float, ttl: float, feedback: float) -> float:
    """Recommendation-cache hit ratio of Poisson users with Zipf(``zipf_s``) shares of ``rate`` requests/s,
    lists kept ``ttl`` s from the miss that wrote them, a request followed by feedback (which makes the next
    request miss) with probability ``feedback``, no eviction. Checked against a request-level simulation
    by bench/bench_cache_model.py. Per user, with x = lambda_u TTL, E[hits per miss] is x (p = 0) or
    (1 - p)/p (1 - exp(-x p)); the ratio is the rate-weighted hits/(1 + hits)."""
    weights = np.arange(1, users + 1, dtype=np.float64) ** -zipf_s
    lam = rate * weights / weights.sum()
    x = lam * ttl
    hits = x if feedback == 0 else (1 - feedback) / feedback * -np.expm1(-x * feedback)
    return float((lam * hits / (1 + hits)).sum() / lam.sum())


@dataclass(frozen=True)
class Figure:
    """A number and where it comes from ("file: key" when measured)."""

    value: float
    source: str
    measured: bool


@dataclass(frozen=True)
class Profile:
    """What one shard replica does on one kind of hardware, as measured."""

    name: str
    backend: str  # the shard's index backend (Helm shard.indexBackend)
    rows: int  # rows of the measured shard
    dim: int
    qps: Figure  # queries/s one replica sustains at ``batch`` rows per Search
    batch: int
    p99_ms: Figure | None
    cores: float  # CPU cores the replica had when measured (the machine's CPUs)
    gpus: int
    bytes_per_row: Figure
    hardware: str


@dataclass(frozen=True)
class FanoutCost:
    """Router CPU per miss as a function of shards: base + per_shard x N, fitted over ``ns``."""

    base_ms: float
    per_shard_ms: float
    ns: tuple[int, ...]
    source: str

    def cpu_ms(self, shards: int) -> float:
        return self.base_ms + self.per_shard_ms * shards


@dataclass(frozen=True)
class Measured:
    """Everything the planner reads from bench/results/."""

    profiles: dict[str, Profile]
    fanout: FanoutCost | None
    router_cpu_ms_per_hit: Figure | None
    redis_ops_per_master: Figure | None
    cache_service_qps: Figure | None
    missing: tuple[str, ...] = ()


def _load(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _cpus(doc: dict[str, Any]) -> int:
    return int((doc.get("machine") or {}).get("cpus") or doc.get("cpus") or 1)


def _shard_profiles(name: str, doc: dict[str, Any]) -> dict[str, Profile]:
    """CPU profiles from a bench-shard file: each backend's saturated gRPC QPS at batch 1 and 32."""
    out: dict[str, Profile] = {}
    rows, dim, cpus = int(doc["items"]), int(doc["dim"]), _cpus(doc)
    tag = Path(name).stem.removeprefix("bench_shard").replace("_", "-")  # bench_shard_ef256.json -> -ef256
    for backend, b in doc.get("backends", {}).items():
        raw = Figure(2 * dim + COLUMN_BYTES_PER_ROW, f"FP16 row + {COLUMN_BYTES_PER_ROW} B of columns (not measured)",
                     False)
        if backend == "hnsw":
            m = int(b.get("hnsw_m", 32))
            raw = Figure(6 * dim + 8 * m + COLUMN_BYTES_PER_ROW,
                         f"FP16 row + faiss float32 copy + graph (M={m}) + columns (not measured)", False)
        grpc = b.get("grpc") or {}
        chosen = next((s for s in b.get("sweep", []) if s.get("ef") == b.get("chosen_ef")), None)
        p99 = (Figure(chosen["p99_ms_b1"], f"{name}: backends.{backend}.sweep[ef={b.get('chosen_ef')}].p99_ms_b1 "
                      "(in process, batch 1)", True) if chosen and "p99_ms_b1" in chosen else None)
        for batch, key in ((1, "sat_qps_b1"), (32, "sat_qps_b32")):
            if key not in grpc:
                continue
            pname = f"cpu-{backend}-{rows // 1000}k{tag}" + ("" if batch == 1 else f"-b{batch}")
            out[pname] = Profile(
                pname, backend, rows, dim, Figure(grpc[key], f"{name}: backends.{backend}.grpc.{key}", True), batch,
                p99, cpus, 0, raw, f"{cpus} CPUs ({doc.get('machine', {}).get('machine', '?')})")
    return out


def _scale_profile(doc: dict[str, Any]) -> dict[str, Profile]:
    """The large CPU shard of bench-shard-scale (shard_scale.json), when it has been measured: batch 1 from
    its in-process single-core sweep (``qps_batch1_per_core``, one core), batch 32 from its gRPC run
    (``qps_b32_grpc``, the machine's CPUs)."""
    if not all(k in doc for k in ("rows", "dim")):
        return {}
    cpus = _cpus(doc)
    rows, dim = int(doc["rows"]), int(doc["dim"])
    backend = str(doc.get("backend", "ivf"))
    if "rss_bytes" in doc:
        bpr = Figure(doc["rss_bytes"] / rows, "shard_scale.json: rss_bytes / rows", True)
    else:
        bpr = Figure(2 * dim + COLUMN_BYTES_PER_ROW, "FP16 row + columns (not measured)", False)
    writes = doc.get("writes") or {}
    p99 = (Figure(writes["p99_ms_without_writes"], "shard_scale.json: writes.p99_ms_without_writes", True)
           if "p99_ms_without_writes" in writes else None)
    size = f"{rows // 1_000_000}m" if rows >= 1_000_000 else f"{rows // 1000}k"
    out: dict[str, Profile] = {}
    if "qps_batch1_per_core" in doc:
        name = f"cpu-{backend}-{size}"
        out[name] = Profile(name, backend, rows, dim,
                            Figure(doc["qps_batch1_per_core"], "shard_scale.json: qps_batch1_per_core (in process, "
                                   "one core)", True), 1, p99, 1, 0, bpr, "1 core")
    if "qps_b32_grpc" in doc:
        name = f"cpu-{backend}-{size}-b32"
        out[name] = Profile(name, backend, rows, dim, Figure(doc["qps_b32_grpc"], "shard_scale.json: qps_b32_grpc",
                                                            True), 32, p99, cpus, 0, bpr, f"{cpus} CPUs")
    return out


def _gpu_profile(doc: dict[str, Any]) -> dict[str, Profile]:
    """A CAGRA profile from bench_gpu.json (measured on a GPU): the smallest itopk with recall >= 0.95."""
    sweep = [r for r in doc.get("cagra_sweep", []) if r.get("recall_at_10", 0) >= 0.95 and r.get("qps")]
    if not sweep or "items" not in doc or "dim" not in doc:
        return {}
    row = min(sweep, key=lambda r: r["itopk_size"])
    rows, dim = int(doc["items"]), int(doc["dim"])
    out = {}
    for batch in ("1", "32"):
        if batch in row["qps"]:
            name = f"gpu-cagra-{rows // 1_000_000}m" + ("" if batch == "1" else "-b32")
            out[name] = Profile(
                name, "cuvs", rows, dim,
                Figure(row["qps"][batch], f"bench_gpu.json: cagra_sweep[itopk={row['itopk_size']}].qps.{batch} "
                       "(in process, not over gRPC)", True), int(batch), None, 0, 1,
                Figure(2 * dim + COLUMN_BYTES_PER_ROW, "FP16 row + columns (not measured)", False),
                str(doc.get("gpu_name", "GPU")))
    return out


def _fanout(doc: dict[str, Any]) -> FanoutCost | None:
    """Router CPU per miss over the shard count, one call per shard: a planned shard is one process (its
    measured size is a process's rows), and a call, not a logical shard, is what the router pays for. So
    the fit is of the bench's ``servers`` layout (one call per shard) when the file has it."""
    per_n = doc.get("per_n") or {}
    layout = "servers" if "servers" in (doc.get("layouts") or ()) else None
    key = f"per_n.*.{layout}.fixed_rate.router_cpu_ms_per_miss" if layout else "per_n.*.router_cpu_ms_per_miss"
    points = sorted((int(n), r[layout]["fixed_rate"]["router_cpu_ms_per_miss"] if layout else r["router_cpu_ms_per_miss"])
                    for n, r in per_n.items() if (layout in r if layout else "router_cpu_ms_per_miss" in r))
    if len(points) < 2:
        return None
    xs = np.asarray([p[0] for p in points], float)
    ys = np.asarray([p[1] for p in points], float)
    slope, intercept = np.polyfit(xs, ys, 1)
    return FanoutCost(float(intercept), float(slope), tuple(int(x) for x in xs),
                      f"fanout.json: least-squares fit of {key} over N (one call per shard)")


def _router_hit_cpu(doc: dict[str, Any]) -> Figure | None:
    phase = next((p for p in doc.get("phases", []) if p.get("name") == "hit_max"), None)
    if phase is None:
        return None
    iterations = phase["metrics"]["iterations"]["count"]
    cores = sum(v for k, v in phase["cpu_cores"].items() if k.startswith("router"))
    return Figure(1e3 * cores * phase["wall_seconds"] / iterations,
                  "k6_local_stack.json: phases[hit_max] router CPU x wall / iterations", True)


def _cache_figures(doc: dict[str, Any]) -> tuple[Figure | None, Figure | None]:
    by = (doc.get("throughput") or {}).get("by_concurrency") or {}
    top = max(by, key=int, default=None)
    if top is None:
        return None, None
    med = by[top].get("medians") or {}

    def fig(key: str, what: str) -> Figure | None:
        v = med.get(key)
        v = v.get("qps") if isinstance(v, dict) else v
        return None if v is None else Figure(float(v), f"bench_cache.json: by_concurrency.{top}.medians.{key} ({what})",
                                             True)

    return (fig("raw_get", "one redis-py client's GETs on one cluster: a lower bound on a master"),
            fig("service_get", "one cache-service process"))


def load_measured(results: Path) -> Measured:
    profiles: dict[str, Profile] = {}
    missing: list[str] = []
    for name in sorted(p.name for p in results.glob("bench_shard*.json")):
        doc = _load(results / name)
        if doc and "backends" in doc:
            profiles.update(_shard_profiles(name, doc))
    scale = _load(results / "shard_scale.json")
    if scale:
        profiles.update(_scale_profile(scale))
    else:
        missing.append("shard_scale.json (bench-shard-scale): no 1M-row CPU profile")
    gpu = _load(results / "bench_gpu.json")
    if gpu:
        profiles.update(_gpu_profile(gpu))
    if not any(p.gpus for p in profiles.values()):
        missing.append("bench_gpu.json: no GPU profile measured")
    fan = _load(results / "fanout.json")
    fanout = _fanout(fan) if fan else None
    if fanout is None:
        missing.append("fanout.json (bench-fanout): router CPU per shard not measured")
    stack = _load(results / "k6_local_stack.json")
    hit = _router_hit_cpu(stack) if stack else None
    cache = _load(results / "bench_cache.json")
    redis, service = _cache_figures(cache) if cache else (None, None)
    return Measured(profiles, fanout, hit, redis, service, tuple(missing))


@dataclass(frozen=True)
class Inputs:
    items: int = 100_000_000
    dim: int = 1024
    peak_rps: float = 166_000
    users: int = 10_000_000
    zipf_s: float = 1.1
    hit_ratio: float | None = None  # a measured hit ratio instead of the model
    ttl_seconds: float = 300
    feedback: float = 0.0  # probability that a request is followed by feedback
    p99_ms: float = 100
    replicas: int = 2  # at least this many replicas per shard
    k: int = 10
    utilisation: float = 0.6  # of each replica's / router's measured capacity
    router_cores: float = 1.0  # a router is one Python event loop: about one core
    rows_per_shard: int | None = None  # None: the profile's measured shard size
    redis_master_gb: float = 8.0


@dataclass
class Plan:
    profile: str
    hit_ratio: Figure
    miss_rps: float
    shards: int
    rows_per_shard: int
    replicas: int
    replicas_for_load: int
    router_cpu_ms_per_miss: Figure
    router_cpu_ms_per_hit: Figure
    routers: int
    redis_masters: int
    redis_live_lists: float
    redis_bytes: float
    cache_replicas: int
    shard_cores: float
    router_cores: float
    gpus: int
    memory_per_shard_bytes: float
    bytes_per_row: Figure
    replica_qps: Figure
    shard_p99_ms: Figure | None
    seed_formula_gpus: int
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def make_plan(inp: Inputs, profile: Profile, measured: Measured) -> Plan:
    notes: list[str] = []
    if inp.hit_ratio is not None:
        hit = Figure(inp.hit_ratio, "given (--hit-ratio)", True)
    else:
        hit = Figure(model_hit_ratio(inp.peak_rps, inp.users, inp.zipf_s, inp.ttl_seconds, inp.feedback),
                     f"cache model: Zipf({inp.zipf_s}) over {inp.users:,} users, TTL {inp.ttl_seconds:g} s, "
                     f"feedback {inp.feedback:g} (not measured at this scale)", False)
    miss = inp.peak_rps * (1 - hit.value)
    rows = inp.rows_per_shard or profile.rows
    shards = max(1, math.ceil(inp.items / rows))
    qps = profile.qps.value
    qps_source = profile.qps.source
    if rows != profile.rows:
        qps *= profile.rows / rows
        qps_source += f" x {profile.rows:,}/{rows:,} rows (scaled as a scan would, not measured)"
        notes.append(f"shards of {rows:,} rows: the profile measured {profile.rows:,}; replica QPS scaled "
                     "linearly (not measured)")
    if inp.dim != profile.dim:
        qps *= profile.dim / inp.dim
        qps_source += f" x {profile.dim}/{inp.dim} (scaled by dimension, not measured)"
        notes.append(f"profile measured at dim {profile.dim}; QPS scaled to dim {inp.dim} (not measured)")
    replica_qps = Figure(qps, qps_source, inp.dim == profile.dim and rows == profile.rows)
    for_load = math.ceil(miss / (qps * inp.utilisation)) if miss > 0 else 0
    replicas = max(inp.replicas, for_load)
    if measured.fanout is not None:
        fan = measured.fanout
        cpu_miss = Figure(fan.cpu_ms(shards), f"{fan.source}: {fan.base_ms:.2f} + {fan.per_shard_ms:.3f} x {shards}",
                          shards <= max(fan.ns))
        if shards > max(fan.ns):
            notes.append(f"router CPU per miss extrapolated from N <= {max(fan.ns)} to {shards} shards")
    else:
        cpu_miss = Figure(math.nan, "fanout.json missing: run make bench-fanout", False)
        notes.append("no fan-out measurement: the router count is unknown")
    cpu_hit = measured.router_cpu_ms_per_hit or Figure(0.0, "k6_local_stack.json missing (taken as 0)", False)
    router_ms_per_s = miss * cpu_miss.value + (inp.peak_rps - miss) * cpu_hit.value
    routers = (math.ceil(router_ms_per_s / 1e3 / (inp.router_cores * inp.utilisation))
               if not math.isnan(router_ms_per_s) else 0)
    ops = inp.peak_rps + miss  # one lookup per request, one put per miss
    live = min(float(inp.users), miss * inp.ttl_seconds)
    redis_bytes = live * (LIST_ENTRY_OVERHEAD_BYTES + LIST_ITEM_BYTES * inp.k)
    masters = REDIS_CLUSTER_MIN_MASTERS
    if measured.redis_ops_per_master is not None:
        masters = max(masters, math.ceil(ops / (measured.redis_ops_per_master.value * inp.utilisation)))
    masters = max(masters, math.ceil(redis_bytes / (inp.redis_master_gb * 2**30 * 0.7)))
    cache_replicas = (math.ceil(ops / (measured.cache_service_qps.value * inp.utilisation))
                      if measured.cache_service_qps is not None else 0)
    if profile.p99_ms is not None and profile.p99_ms.value > inp.p99_ms:
        notes.append(f"the shard's measured p99 ({profile.p99_ms.value:.1f} ms) alone exceeds the target "
                     f"{inp.p99_ms:g} ms: this profile cannot meet it")
    # The seed's own estimate_required_gpus: misses / 200 req/s per T4 x 1.5 (its assumptions).
    seed = math.ceil(miss / 200 * 1.5)
    return Plan(
        profile=profile.name, hit_ratio=hit, miss_rps=miss, shards=shards, rows_per_shard=rows, replicas=replicas,
        replicas_for_load=for_load, router_cpu_ms_per_miss=cpu_miss, router_cpu_ms_per_hit=cpu_hit,
        routers=routers, redis_masters=masters, redis_live_lists=live, redis_bytes=redis_bytes,
        cache_replicas=cache_replicas, shard_cores=shards * replicas * profile.cores,
        router_cores=routers * inp.router_cores, gpus=shards * replicas * profile.gpus,
        memory_per_shard_bytes=rows * profile.bytes_per_row.value, bytes_per_row=profile.bytes_per_row,
        replica_qps=replica_qps, shard_p99_ms=profile.p99_ms, seed_formula_gpus=seed, notes=notes)


def _mi(nbytes: float) -> str:
    return f"{max(1, math.ceil(nbytes / 2**20))}Mi"


def _gi(nbytes: float) -> str:
    return f"{max(1, math.ceil(nbytes / 2**30))}Gi"


def helm_values(plan: Plan, inp: Inputs, profile: Profile) -> dict[str, Any]:
    """Values for deploy/helm/gmco that deploy the plan (on top of the chart's values.yaml)."""
    memory = plan.memory_per_shard_bytes
    shard: dict[str, Any] = {
        "replicas": plan.replicas,
        "dim": inp.dim,
        "indexBackend": profile.backend,
        "resources": {"requests": {"cpu": f"{math.ceil(profile.cores * 1000)}m" if profile.cores else "1",
                                   "memory": _mi(memory * 1.25)},
                      "limits": {"memory": _mi(memory * 1.5)}},
        "persistence": {"enabled": True, "storageClass": "", "size": _gi(memory * 2),
                        "mountPath": "/var/lib/gmco/snapshots"},
    }
    if profile.gpus:
        shard["gpu"] = {"count": profile.gpus}
    else:  # a CPU shard: no GPU, and off the GPU nodes
        shard.update(gpu={"count": 0}, nodeSelector={"nvidia.com/gpu.present": None}, tolerations=[])
    routers = max(1, plan.routers)
    return {
        "global": {"shards": {"count": plan.shards}},
        "shard": shard,
        "router": {"replicas": routers,
                   "resources": {"requests": {"cpu": f"{math.ceil(inp.router_cores * 1000)}m", "memory": "1Gi"},
                                 "limits": {"memory": "2Gi"}},
                   "hpa": {"enabled": True, "minReplicas": routers, "maxReplicas": max(routers + 1, math.ceil(routers * 1.5))}},
        "cache": {"replicas": max(1, plan.cache_replicas),
                  "hpa": {"enabled": True, "minReplicas": max(1, plan.cache_replicas),
                          "maxReplicas": max(2, math.ceil(max(1, plan.cache_replicas) * 1.5))}},
    }


def report(plan: Plan, inp: Inputs, measured: Measured) -> str:
    """The plan as text: each figure with its source."""

    def src(f: Figure | None) -> str:
        if f is None:
            return "not measured"
        return ("measured: " if f.measured else "") + f.source

    p99 = (f"{plan.shard_p99_ms.value:.2f} ms   [{src(plan.shard_p99_ms)}]" if plan.shard_p99_ms
           else "not measured")
    lines = [
        (f"profile {plan.profile}; {inp.items:,} x {inp.dim} items, peak {inp.peak_rps:,.0f} req/s, "
         f"{inp.users:,} users, TTL {inp.ttl_seconds:g} s, p99 target {inp.p99_ms:g} ms"),
        f"  hit ratio            {plan.hit_ratio.value:.4f}   [{src(plan.hit_ratio)}]",
        f"  misses               {plan.miss_rps:,.0f} req/s (each searches every shard)",
        f"  shards               {plan.shards:,} of {plan.rows_per_shard:,} rows",
        f"  replica QPS          {plan.replica_qps.value:,.1f} queries/s   [{src(plan.replica_qps)}]",
        (f"  replicas per shard   {plan.replicas} (load needs {plan.replicas_for_load} at {inp.utilisation:.0%} "
         f"utilisation; at least {inp.replicas} asked)"),
        f"  shard p99            {p99}",
        f"  router CPU per miss  {plan.router_cpu_ms_per_miss.value:.2f} ms   [{src(plan.router_cpu_ms_per_miss)}]",
        f"  router CPU per hit   {plan.router_cpu_ms_per_hit.value:.2f} ms   [{src(plan.router_cpu_ms_per_hit)}]",
        f"  routers              {plan.routers:,} of {inp.router_cores:g} core",
        f"  cache service        {plan.cache_replicas:,} replicas   [{src(measured.cache_service_qps)}]",
        (f"  Redis masters        {plan.redis_masters:,} (ops: [{src(measured.redis_ops_per_master)}]; "
         f"{plan.redis_live_lists:,.0f} live lists, {plan.redis_bytes / 2**30:.1f} GiB at an assumed "
         f"{LIST_ENTRY_OVERHEAD_BYTES}+{LIST_ITEM_BYTES}k B per list)"),
        f"  memory per shard     {plan.memory_per_shard_bytes / 2**30:.2f} GiB   [{src(plan.bytes_per_row)}]",
        (f"  shard cores / GPUs   {plan.shard_cores:,.0f} cores, {plan.gpus:,} GPUs; "
         f"router cores {plan.router_cores:,.0f}"),
        (f"  seed formula         {plan.seed_formula_gpus:,} GPUs (misses / 200 req/s per T4 x 1.5: the seed's "
         "assumption, not measured here)"),
    ]
    lines += [f"  note: {n}" for n in plan.notes]
    lines += [f"  missing: {m}" for m in measured.missing]
    return "\n".join(lines)
