"""``make bench``: k6 against the local stack behind Envoy; writes JSON, a PNG and docs/benchmarks.md.

Phases, each a separate k6 run with its own summary:
  warm      closed loop over HIT_USERS users, filling the cache (not reported)
  hit       the same users at a fixed arrival rate: the cache-hit path
  hit_max   the same users, closed loop: the most the hit path sustains
  miss      every request skips the cache (Zipf over 1M users) at a fixed rate: the full miss path
  miss_max  the miss path, closed loop
  zipf      realistic traffic (Zipf(1.1) over 1M users, no skip) after a warm-up of the same traffic:
            the steady-state hit ratio
  mixed     recommend + feedback + batch calls, closed loop
  hit_max_no_l1  hit_max again after the routers restart with their own list LRU off
            (GMCO_ROUTER_LIST_CACHE_ENTRIES=0), so every hit goes to the cache service: the same run's
            side-by-side measure of what the router-local list cache is worth
CPU per process is read from /proc/<pid>/stat before and after each phase.
k6 runs with ``GOGC=400`` unless the environment sets GOGC: it shares the stack's cores, and Go's default
collects its heap about four times as often, each collection's workers taking CPU from the processes
measured (side by side at 1,000 hits a second: p99 6.2-7.9 against 7.7-11.1 ms, docs/benchmarks.md).

SLO phases (``--slo``, on by default; ``bench/results/k6_slo.json``), measured as SLOs are measured, in an
open model: the popular users first get state (``seed``: a Recommend and a positive feedback each); then
the miss path (``skip_cache``, Zipf(1.1) over 1M users) and the hit path are driven at fixed arrival
rates stepping up a ladder, each step a k6 run whose exit code is the verdict (p99 within target, no
failed or degraded check, no dropped iteration); the highest passing step is the path's capacity at its
p99 target. Also: an idle sequential miss of first-time users (p50), the miss path in a closed loop
(QPS, and CPU per miss summed over every stack process), and the bare shard service's QPS measured with
k6 against one shard directly (same data, same k', same kind of filter), the reference the miss path's
QPS is compared with: measured every way a shard can run here, its searches on its event loop or in a
worker thread (GMCO_SHARD_SEARCH_IN_THREAD) and gRPC's core with its own defaults or with the services'
GRPC_EXPERIMENTS (gmco_common.grpc_defaults), shard-0 restarted for each; the fastest of the four. The
ratio of the two is then measured in PAIRS pairs (``--pairs``, 3), each a closed loop of misses followed
by a bare-shard run in that fastest way, so that both halves of a pair see the same state of a shared
machine: the figures are the medians, and every pair is in the JSON (``pairs``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from gmco_stack.stack import Stack, StackConfig

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
DOC = ROOT / "docs" / "benchmarks.md"
SECTION = "## Local stack (k6)"
ANALYSIS = "### Analysis"
K6 = ROOT / ".venv" / "bin" / "k6"
SCRIPT = ROOT / "bench" / "k6" / "recommend.js"
SHARD_SCRIPT = ROOT / "bench" / "k6" / "shard_search.js"
HIT_LADDER = (250, 500, 750, 1000, 1250, 1500, 2000)
MISS_LADDER = (50, 100, 150, 200, 250, 300, 400)
CLK_TCK = os.sysconf("SC_CLK_TCK")
NO_L1 = {"GMCO_ROUTER_LIST_CACHE_ENTRIES": "0"}
IN_THREAD = "GMCO_SHARD_SEARCH_IN_THREAD"
GRPC_EXPERIMENTS = "GRPC_EXPERIMENTS"
K6_GOGC = "400"


@dataclass
class Phase:
    name: str
    env: dict[str, str]
    reported: bool = True
    summary: dict = field(default_factory=dict)
    cpu: dict[str, float] = field(default_factory=dict)
    wall: float = 0.0
    exit_code: int = 0
    router_env: dict[str, str] = field(default_factory=dict)  # extra router settings for this phase


def cpu_ticks(pid: int) -> int:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0
    return int(fields[11]) + int(fields[12])  # utime + stime (fields 14 and 15 of stat)


def run_phase(stack: Stack, phase: Phase, common: dict[str, str], script: Path = SCRIPT,
              target: str | None = None) -> None:
    summary_path = RESULTS / f"k6_{phase.name}.json"
    env = {**common, **phase.env, "TARGET": target or stack.envoy_target}
    cmd = [str(K6), "run", "--quiet", "--summary-export", str(summary_path)]
    for k, v in env.items():
        cmd += ["-e", f"{k}={v}"]
    cmd.append(str(script))
    pids = stack.pids()
    before = {name: cpu_ticks(pid) for name, pid in pids.items()}
    start = time.monotonic()
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "GOGC": os.environ.get("GOGC", K6_GOGC)})
    k6_before = cpu_ticks(proc.pid)
    k6_ticks = k6_before
    while proc.poll() is None:
        k6_ticks = max(k6_ticks, cpu_ticks(proc.pid))
        time.sleep(0.5)
    phase.wall = time.monotonic() - start
    phase.exit_code = proc.returncode
    out = proc.stdout.read() if proc.stdout else ""
    phase.cpu = {name: (cpu_ticks(pid) - before[name]) / CLK_TCK / phase.wall for name, pid in pids.items()}
    phase.cpu["k6"] = (k6_ticks - k6_before) / CLK_TCK / phase.wall
    phase.summary = json.loads(summary_path.read_text()) if summary_path.is_file() else {}
    if not phase.summary:
        raise RuntimeError(f"k6 phase {phase.name} wrote no summary:\n{out[-3000:]}")
    print(f"  {phase.name}: {describe(phase)}", flush=True)


def metric(phase: Phase, name: str, stat: str) -> float:
    return float(phase.summary["metrics"].get(name, {}).get(stat, 0.0))


def describe(phase: Phase) -> str:
    return (f"{metric(phase, 'iterations', 'rate'):.0f} req/s, p50 {metric(phase, 'grpc_req_duration', 'med'):.2f} ms, "
            f"p99 {metric(phase, 'grpc_req_duration', 'p(99)'):.2f} ms, hit ratio {metric(phase, 'cache_hit', 'value'):.3f}, "
            f"checks failed {metric(phase, 'checks', 'fails'):.0f}, dropped {metric(phase, 'dropped_iterations', 'count'):.0f}")


def phases(args: argparse.Namespace) -> list[Phase]:
    d = args.duration
    hit_users = str(args.hit_users)
    return [
        Phase("warm", {"USERS": hit_users, "VUS": "16", "DURATION": args.warm}, reported=False),
        Phase("hit", {"USERS": hit_users, "RATE": str(args.hit_rate), "VUS": "64", "DURATION": d,
                      "P99_MS": "10"}),
        Phase("hit_max", {"USERS": hit_users, "VUS": "32", "DURATION": d, "P99_MS": "10"}),
        Phase("miss", {"SKIP_CACHE": "1", "RATE": str(args.miss_rate), "VUS": "64", "DURATION": d, "P99_MS": "50"}),
        Phase("miss_max", {"SKIP_CACHE": "1", "VUS": "16", "DURATION": d, "P99_MS": "50"}),
        Phase("zipf_warm", {"VUS": "16", "DURATION": args.warm}, reported=False),
        Phase("zipf", {"VUS": "16", "DURATION": d}),
        Phase("mixed", {"SCENARIO": "mixed", "VUS": "16", "DURATION": d}),
        # Last, because the routers restart for them (their version maps start empty: hence the warm-up).
        Phase("warm_no_l1", {"USERS": hit_users, "VUS": "16", "DURATION": args.warm}, reported=False,
              router_env=NO_L1),
        Phase("hit_max_no_l1", {"USERS": hit_users, "VUS": "32", "DURATION": d, "P99_MS": "10"}, router_env=NO_L1),
    ]


def apply_router_env(stack: Stack, base: dict[str, dict[str, str]], extra: dict[str, str]) -> None:
    """Restart the routers whose environment is not ``base`` + ``extra``."""
    for router in stack.routers:
        want = {**base[router.name], **extra}
        if router.env != want:
            router.env = want
            stack.restart(router.name)


def plot(results: list[Phase], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [p.name for p in results]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    x = range(len(names))
    for offset, stat, label in ((-0.2, "med", "p50"), (0.2, "p(99)", "p99")):
        ax1.bar([i + offset for i in x], [metric(p, "grpc_req_duration", stat) for p in results], 0.4, label=label)
    ax1.set_xticks(list(x), names)
    ax1.set_ylabel("latency through Envoy (ms)")
    ax1.set_yscale("log")
    ax1.legend()
    ax1.set_title("Recommend latency by phase")
    ax2.bar(names, [metric(p, "iterations", "rate") for p in results], color="tab:green")
    ax2.set_ylabel("requests / s")
    ax2.set_title("Throughput by phase")
    fig.suptitle("GMC-O local stack, k6 through Envoy (shared 2-core machine)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def l1_line(by: dict[str, Phase]) -> list[str]:
    if "hit_max" not in by or "hit_max_no_l1" not in by:
        return []
    on, off = by["hit_max"], by["hit_max_no_l1"]
    r_on, r_off = metric(on, "iterations", "rate"), metric(off, "iterations", "rate")
    return [(f"- router-local list cache, same run: hit_max {r_on:.0f} req/s (p99 "
            f"{metric(on, 'grpc_req_duration', 'p(99)'):.2f} ms) with it, {r_off:.0f} req/s (p99 "
            f"{metric(off, 'grpc_req_duration', 'p(99)'):.2f} ms) without: {r_on / max(r_off, 1e-9):.2f}x.")]


def plot_slo(result: dict, path: Path) -> None:
    """p99 of every ladder step against its target (miss and hit), and CPU per request per process."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    for ax, label, target in ((axes[0], "miss", result["miss_p99_target_ms"]),
                              (axes[1], "hit", result["hit_p99_target_ms"])):
        steps = result[label]["steps"]
        rates = [st["rate"] for st in steps]
        ax.plot(rates, [st["p99_ms"] for st in steps], "o-", label="p99")
        ax.plot(rates, [st["p50_ms"] for st in steps], "s--", label="p50")
        for st in steps:
            ax.annotate("pass" if st["passed"] else "fail", (st["rate"], st["p99_ms"]), textcoords="offset points",
                        xytext=(0, 6), ha="center", fontsize=8)
        ax.axhline(target, color="tab:red", lw=1, label=f"p99 target {target} ms")
        ax.set_yscale("log")
        ax.set_xlabel("arrival rate (req/s)")
        ax.set_ylabel("latency through Envoy (ms)")
        ax.set_title(f"{label} path: highest passing rate {result[label]['max_rate_at_p99_target']} req/s")
        ax.legend(fontsize=8)
    cores = result["miss_closed_loop_cpu_cores"]
    qps = max(result["miss_closed_loop_qps"], 1e-9)
    names = sorted(cores)
    axes[2].bar(names, [1e3 * cores[n] / qps for n in names], color="tab:purple")
    axes[2].set_ylabel("CPU ms per miss (closed loop)")
    axes[2].set_title(f"miss path CPU: {result['cpu_ms_per_miss']:.1f} ms per miss in all")
    axes[2].tick_params(axis="x", rotation=45)
    fig.suptitle("GMC-O SLO phases, k6 constant-arrival-rate (shared 2-core machine)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def doc_section(args: argparse.Namespace, results: list[Phase], stack: Stack, started: str,
                load_at_start: float) -> str:
    by = {p.name: p for p in results}
    rows = []
    for p in results:
        rows.append(f"| {p.name} | {metric(p, 'iterations', 'rate'):.0f} | {metric(p, 'grpc_req_duration', 'med'):.2f} | "
                    f"{metric(p, 'grpc_req_duration', 'p(99)'):.2f} | {metric(p, 'cache_hit', 'value'):.3f} | "
                    f"{metric(p, 'checks', 'fails'):.0f} | {metric(p, 'dropped_iterations', 'count'):.0f} |")
    procs = sorted({n for p in results for n in p.cpu})
    cpu_rows = [f"| {n} | " + " | ".join(f"{p.cpu.get(n, 0.0):.2f}" for p in results) + " |" for n in procs]
    hit, miss = by["hit"], by["miss"]
    verdict = []
    for label, p, rate, p99 in (("hit path", hit, args.hit_rate, 10.0), ("miss path", miss, args.miss_rate, 50.0)):
        got_rate, got_p99 = metric(p, "iterations", "rate"), metric(p, "grpc_req_duration", "p(99)")
        ok = got_rate >= 0.98 * rate and got_p99 <= p99
        verdict.append(f"- {label}: target ≥ {rate} req/s with p99 ≤ {p99:g} ms; measured {got_rate:.0f} req/s, "
                       f"p99 {got_p99:.2f} ms — {'met' if ok else 'missed'}.")
    return "\n".join([
        SECTION,
        "",
        (f"Measured {started} on the {os.cpu_count()}-CPU development machine "
         f"({platform.processor() or platform.machine()}; load average {load_at_start:.1f} just before the "
         "stack started)."),
        (f"Command: `make bench` (= `python bench/run_k6.py --items {args.items} --dim {args.dim} "
         f"--duration {args.duration}`). Stack: {stack.config.shards} shards ({stack.config.index_backend}), "
         f"{stack.config.routers} routers, cache/ontology/rl_state with embedded backends, Envoy "
         f"(RING_HASH on x-user-id); catalogue {args.items:,} x {args.dim} FP16; k = 10. k6, Envoy and every "
         "service share the same 2 cores."),
        "",
        ("Phases (each its own k6 run, through Envoy): `hit` = users u1..u"
         f"{args.hit_users} after a warm-up, at a fixed arrival rate ({args.hit_rate}/s) — the cache-hit path; "
         f"`miss` = `skip_cache`, Zipf(1.1) over 1M users at {args.miss_rate}/s — the full miss path; `*_max` = "
         "the same traffic in a closed loop (most it sustains); `zipf` = realistic traffic (Zipf(1.1) over 1M "
         "users, 3 surfaces) after a warm-up of the same traffic, whose hit ratio is the steady-state one; "
         "`mixed` = 80% Recommend, 15% RecordFeedback, 5% RecommendBatch(3); `hit_max_no_l1` = `hit_max` with "
         "the routers' own list LRU off (`GMCO_ROUTER_LIST_CACHE_ENTRIES=0`), every hit served by the cache "
         "service."),
        "",
        "| phase | req/s | p50 ms | p99 ms | hit ratio | failed checks | dropped iterations |",
        "|---|---|---|---|---|---|---|",
        *rows,
        "",
        "Targets:",
        *verdict,
        f"- steady-state hit ratio (zipf phase): {metric(by['zipf'], 'cache_hit', 'value'):.3f}.",
        *l1_line(by),
        "",
        "CPU per process (cores used, averaged over each phase; 2.00 = both cores):",
        "",
        "| process | " + " | ".join(p.name for p in results) + " |",
        "|---|" + "---|" * len(results),
        *cpu_rows,
        "",
        ("Raw k6 summaries: `bench/results/k6_<phase>.json`; all phases with CPU: "
         "`bench/results/k6_local_stack.json`; plot: `bench/results/k6_local_stack.png`."),
        "",
    ])


def write_section(text: str) -> None:
    """Replace this benchmark's section, keeping its hand-written ``### Analysis`` subsection."""
    doc = DOC.read_text() if DOC.is_file() else "# Benchmarks\n"
    pattern = re.compile(rf"^{re.escape(SECTION)}\n.*?(?=^## |\Z)", re.DOTALL | re.MULTILINE)
    found = pattern.search(doc)
    if found:
        old = found.group(0)
        analysis = old[old.index(ANALYSIS):].rstrip("\n") + "\n" if ANALYSIS in old else ""
        doc = pattern.sub(lambda _m: text + ("\n" + analysis if analysis else "") + "\n", doc)
    else:
        doc = doc.rstrip("\n") + "\n\n" + text
    DOC.write_text(doc)


def stack_cpu_seconds(phase: Phase) -> float:
    """CPU seconds every stack process used during the phase (k6, the load generator, left out)."""
    return sum(v for name, v in phase.cpu.items() if name != "k6") * phase.wall


def ladder(stack: Stack, label: str, rates: tuple[int, ...], env: dict[str, str], step: str) -> dict:
    """Step the arrival rate up; the highest step whose k6 run passed (exit code 0)."""
    steps = []
    failures = 0
    for rate in rates:
        phase = Phase(f"slo_{label}_{rate}", {**env, "RATE": str(rate), "VUS": str(max(32, rate // 10)),
                                              "DURATION": step})
        run_phase(stack, phase, {"K": "10"})
        passed = phase.exit_code == 0
        steps.append({"rate": rate, "passed": passed, "k6_exit_code": phase.exit_code,
                      "achieved_rate": metric(phase, "iterations", "rate"),
                      "p50_ms": metric(phase, "grpc_req_duration", "med"),
                      "p99_ms": metric(phase, "grpc_req_duration", "p(99)"),
                      "failed_checks": metric(phase, "checks", "fails"),
                      "dropped_iterations": metric(phase, "dropped_iterations", "count"),
                      "cpu_ms_per_request": 1e3 * stack_cpu_seconds(phase) / max(1.0, metric(phase, "iterations", "count")),
                      "cpu_cores": phase.cpu})
        failures = 0 if passed else failures + 1
        if failures >= 2:
            break
    best = max((st for st in steps if st["passed"]), key=lambda st: st["rate"], default=None)
    return {"steps": steps, "max_rate_at_p99_target": best["rate"] if best else 0,
            "p99_ms_at_that_rate": best["p99_ms"] if best else None}


def write_queries(stack: Stack, path: Path, count: int = 256) -> None:
    import base64

    import numpy as np

    queries = np.load(stack.config.data_dir / "queries.npy")[:count].astype("<f4")
    path.write_text(json.dumps({"dimension": int(queries.shape[1]),
                                "vectors": [base64.b64encode(q.tobytes()).decode() for q in queries]}))


def slo(stack: Stack, args: argparse.Namespace) -> dict:
    """The open-model SLO phases; returns what k6_slo.json holds."""
    out: dict = {"hit_p99_target_ms": 10, "miss_p99_target_ms": 50, "step": args.step}
    print("bench: slo: seeding state for the popular users", flush=True)
    run_phase(stack, Phase("slo_seed", {"SCENARIO": "seed", "USERS": str(args.seed_users), "VUS": "16"}), {"K": "10"})
    print("bench: slo: idle sequential misses of first-time users", flush=True)
    idle = Phase("slo_idle_miss", {"SKIP_CACHE": "1", "FRESH": "1", "VUS": "1", "DURATION": args.step,
                                   "P99_MS": "1000"})
    run_phase(stack, idle, {"K": "10"})
    out["idle_miss_p50_ms"] = metric(idle, "grpc_req_duration", "med")
    out["idle_miss_p99_ms"] = metric(idle, "grpc_req_duration", "p(99)")
    print("bench: slo: the bare shard service, every way a shard can run (k6 against shard-0 directly)", flush=True)
    queries = RESULTS / "k6_shard_queries.json"
    write_queries(stack, queries)
    shard = stack.shard_services[0]
    # Every way a shard can be run here: its searches on the event loop or in a thread, and gRPC's core with
    # its own defaults or with what the services set (gmco_common.grpc_defaults); shard-0 is restarted for each
    # one the stack does not use. The reference is the fastest, so that how the stack configures its shards
    # cannot flatter the ratio.
    base_env = dict(shard.env)
    configured = base_env.get(IN_THREAD, "true").lower() == "true"
    by_mode, envs = {}, {}
    for in_thread in (configured, not configured):
        for experiments in (None, ""):  # None: the service's own default; "": gRPC's defaults
            as_run = in_thread == configured and experiments is None
            env = {**base_env, IN_THREAD: str(in_thread).lower()}
            if experiments is not None:
                env[GRPC_EXPERIMENTS] = experiments
            name = ("in_thread" if in_thread else "on_event_loop") + ("" if experiments is None else "_grpc_defaults")
            _shard_env(stack, shard, env)
            bare = _bare_phase(stack, queries, args, "" if as_run else f"_{name}")
            envs[name] = env
            by_mode[name] = {"qps": metric(bare, "iterations", "rate"), "p50_ms": metric(bare, "grpc_req_duration", "med"),
                             "cpu_cores": bare.cpu, "as_the_stack_runs_it": as_run}
    best = max(by_mode, key=lambda n: by_mode[n]["qps"])
    out["bare_shard_by_mode"] = by_mode
    out["bare_shard_mode"] = best
    # The ratio: the miss path's closed loop and the bare shard (in its fastest way) alternately, so that
    # both see the same state of a shared machine; the medians, and each pair's ratio.
    print(f"bench: slo: the miss path in a closed loop and the bare shard ({best}), alternating, "
          f"{args.pairs} pairs", flush=True)
    pairs = []
    for i in range(args.pairs):
        _shard_env(stack, shard, base_env)
        closed = Phase(f"slo_miss_closed_{i}", {"SKIP_CACHE": "1", "VUS": "16", "DURATION": args.step, "P99_MS": "1000"})
        run_phase(stack, closed, {"K": "10"})
        _shard_env(stack, shard, envs[best])
        bare = _bare_phase(stack, queries, args, f"_paired_{i}")
        pair = {**_closed_loop(closed), "bare_shard_qps": metric(bare, "iterations", "rate"),
                "bare_shard_p50_ms": metric(bare, "grpc_req_duration", "med"), "bare_shard_cpu_cores": bare.cpu}
        pair["ratio"] = pair["miss_closed_loop_qps"] / max(pair["bare_shard_qps"], 1e-9)
        pairs.append(pair)
    _shard_env(stack, shard, base_env)
    queries.unlink()
    out["pairs"] = pairs
    closed_median = _median_by(pairs, "miss_closed_loop_qps")
    out.update({k: v for k, v in closed_median.items() if k.startswith(("miss_closed_loop", "cpu_ms"))})
    out["cpu_ms_per_miss"] = statistics.median(pr["cpu_ms_per_miss"] for pr in pairs)
    out["miss_closed_loop_qps"] = statistics.median(pr["miss_closed_loop_qps"] for pr in pairs)
    bare_median = _median_by(pairs, "bare_shard_qps")
    out["bare_shard_qps"] = statistics.median(pr["bare_shard_qps"] for pr in pairs)
    out["bare_shard_p50_ms"] = bare_median["bare_shard_p50_ms"]
    out["bare_shard_cpu_cores"] = bare_median["bare_shard_cpu_cores"]
    out["miss_qps_over_bare_shard_qps_per_pair_median"] = statistics.median(pr["ratio"] for pr in pairs)
    print("bench: slo: the miss path at fixed arrival rates", flush=True)
    out["miss"] = ladder(stack, "miss", MISS_LADDER, {"SKIP_CACHE": "1", "P99_MS": "50"}, args.step)
    print("bench: slo: the hit path at fixed arrival rates", flush=True)
    run_phase(stack, Phase("slo_hit_warm", {"USERS": str(args.hit_users), "VUS": "16", "DURATION": args.warm}),
              {"K": "10"})
    out["hit"] = ladder(stack, "hit", HIT_LADDER, {"USERS": str(args.hit_users), "P99_MS": "10"}, args.step)
    out["miss_qps_over_bare_shard_qps"] = out["miss_closed_loop_qps"] / max(out["bare_shard_qps"], 1e-9)
    return out


def _closed_loop(closed: Phase) -> dict:
    """What one closed loop of misses measured."""
    # Whole answers only: an iteration the routers shed (RESOURCE_EXHAUSTED) costs next to nothing, so
    # counting it would flatter both the throughput and the CPU per miss. The script adds one sample to its
    # `degraded` rate for every iteration whose checks all passed (OK, items, not degraded).
    answered = closed.summary["metrics"].get("degraded", {})
    answered_count = float(answered.get("passes", 0) + answered.get("fails", 0))
    iterations = max(1.0, metric(closed, "iterations", "count"))
    return {"miss_closed_loop_iterations_per_second": metric(closed, "iterations", "rate"),
            "miss_closed_loop_answered": answered_count,
            "miss_closed_loop_failed_iterations": iterations - answered_count,
            "miss_closed_loop_qps": metric(closed, "iterations", "rate") * answered_count / iterations,
            "miss_closed_loop_p99_ms": metric(closed, "grpc_req_duration", "p(99)"),
            "cpu_ms_per_miss": 1e3 * stack_cpu_seconds(closed) / max(1.0, answered_count),
            "miss_closed_loop_cpu_cores": closed.cpu}


def _median_by(rows: list[dict], key: str) -> dict:
    """The row whose ``key`` is the median (the lower middle one of an even count)."""
    ordered = sorted(rows, key=lambda r: r[key])
    return ordered[(len(ordered) - 1) // 2]


def _shard_env(stack: Stack, shard, env: dict[str, str]) -> None:
    """Run ``shard`` with ``env``, restarting it when that changes what it runs with; the routers' health
    checks and breakers see it back before the next phase."""
    if env != shard.env:
        shard.env = env
        stack.restart(shard.name)
        time.sleep(5)


def _bare_phase(stack: Stack, queries: Path, args: argparse.Namespace, suffix: str) -> Phase:
    bare = Phase("slo_bare_shard" + suffix, {"QUERIES": str(queries), "VUS": "8", "DURATION": args.step, "K": "50"})
    run_phase(stack, bare, {}, script=SHARD_SCRIPT, target=stack.shard_services[0].target)
    return bare


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--items", type=int, default=100_000)
    p.add_argument("--dim", type=int, default=1024)
    p.add_argument("--duration", default="30s", help="length of each reported phase")
    p.add_argument("--warm", default="20s", help="length of each warm-up")
    p.add_argument("--hit-users", type=int, default=200)
    p.add_argument("--hit-rate", type=int, default=1500)
    p.add_argument("--miss-rate", type=int, default=300)
    p.add_argument("--no-doc", action="store_true", help="do not rewrite docs/benchmarks.md")
    p.add_argument("--slo-only", action="store_true", help="only the open-model SLO phases (k6_slo.json)")
    p.add_argument("--no-slo", action="store_true", help="leave the SLO phases out")
    p.add_argument("--step", default="20s", help="length of each SLO ladder step")
    p.add_argument("--seed-users", type=int, default=5000, help="users given state before the SLO phases")
    p.add_argument("--pairs", type=int, default=3,
                   help="closed loops of misses, each followed by a bare-shard run, for the ratio (medians)")
    args = p.parse_args()
    if args.pairs < 1:
        p.error(f"--pairs must be at least 1, got {args.pairs}")
    RESULTS.mkdir(parents=True, exist_ok=True)
    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    load_at_start = os.getloadavg()[0]
    config = StackConfig(items=args.items, dim=args.dim, base_port=None)
    print(f"bench: starting the stack ({args.items:,} x {args.dim}) ...", flush=True)
    with Stack(config) as stack:
        print(f"bench: stack up behind {stack.envoy_target}; running k6 phases", flush=True)
        done = []
        if not args.no_slo:
            result = slo(stack, args)
            result.update({"started": started, "items": args.items, "dim": args.dim,
                           "shards": config.shards, "routers": config.routers,
                           "index_backend": config.index_backend, "load_avg_1m_at_start": load_at_start,
                           "envoy_concurrency": config.envoy_concurrency, "k6_gogc": os.environ.get("GOGC", K6_GOGC),
                           "command": " ".join(sys.argv)})
            (RESULTS / "k6_slo.json").write_text(json.dumps(result, indent=2))
            plot_slo(result, RESULTS / "k6_slo.png")
            print(f"bench: wrote bench/results/k6_slo.{{json,png}}: miss {result['miss']['max_rate_at_p99_target']} "
                  f"req/s, hit {result['hit']['max_rate_at_p99_target']} req/s, idle miss p50 "
                  f"{result['idle_miss_p50_ms']:.1f} ms, CPU {result['cpu_ms_per_miss']:.1f} ms/miss", flush=True)
            if args.slo_only:
                return
        base_env = {r.name: dict(r.env) for r in stack.routers}
        for phase in phases(args):
            apply_router_env(stack, base_env, phase.router_env)
            run_phase(stack, phase, {"K": "10"})
            done.append(phase)
    reported = [ph for ph in done if ph.reported]
    (RESULTS / "k6_local_stack.json").write_text(json.dumps({
        "started": started, "items": args.items, "dim": args.dim, "duration": args.duration,
        "phases": [{"name": ph.name, "wall_seconds": ph.wall, "k6_exit_code": ph.exit_code, "cpu_cores": ph.cpu,
                    "metrics": ph.summary.get("metrics", {})} for ph in done],
    }, indent=2))
    plot(reported, RESULTS / "k6_local_stack.png")
    if not args.no_doc:
        write_section(doc_section(args, reported, stack, started, load_at_start))
    print("bench: wrote bench/results/k6_local_stack.{json,png}" + ("" if args.no_doc else " and docs/benchmarks.md"))


if __name__ == "__main__":
    sys.exit(main())
