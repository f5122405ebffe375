"""rl_state benchmark: does the policy learn, and how fast is the service on PostgreSQL?

1. Simulation. Synthetic users with hidden preference vectors (``gmco_common.datagen``) meet the real
   service (a ``gmco-rl-state`` process, SQLite backend). Each round: draw a random candidate set,
   ask for a slate (Rank), sample a click per shown item from the user's hidden preference, send the
   feedback (RecordFeedback). Three policies see the same candidate sets and the same random draws:
   Thompson sampling (the service default), greedy (same model, GMCO_RL_STATE_POLICY=greedy) and
   random (uniform over the candidates the user has not seen). Cumulative reward after ``--events``
   events is compared.
2. Feedback ingestion against a real PostgreSQL 15 (gmco_testing.postgres, fsync on): batched
   RecordFeedback from concurrent clients, in events per second.
3. GetUserState and Rank (200 candidates, 1024-dim FP16) latency, p50/p99, one call in flight.

Writes bench/results/rl_state.json and bench/results/rl_state.png.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import grpc
import matplotlib
import numpy as np
from gmco.common.v1 import common_pb2
from gmco.rl_state.v1 import rl_state_service_pb2 as pb
from gmco.rl_state.v1 import rl_state_service_pb2_grpc
from gmco_common.datagen import Catalogue, generate_catalogue, generate_users
from gmco_common.vectors import encode_batch, encode_vector, normalize
from gmco_testing.postgres import PostgresServer
from gmco_testing.procs import free_port, stop_process, wait_grpc_serving
from tqdm import tqdm

matplotlib.use("Agg")
import matplotlib.pyplot as plt

RESULTS = Path(__file__).parent / "results"
HOMEPAGE = common_pb2.RequestContext(surface=common_pb2.SURFACE_HOMEPAGE, region="US", device="smart_tv")


# --- the service under test ---------------------------------------------------------------------
@contextmanager
def service(**env: str) -> Iterator[str]:
    """A ``python -m gmco_rl_state`` process on a free port; yields its target."""
    port = free_port()
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("GMCO_RL_STATE_")}
    full_env.update({"GMCO_RL_STATE_PORT": str(port), "GMCO_RL_STATE_LOG_LEVEL": "WARNING",
                     **{f"GMCO_RL_STATE_{k.upper()}": v for k, v in env.items()}})
    proc = subprocess.Popen([sys.executable, "-m", "gmco_rl_state"], env=full_env)
    try:
        wait_grpc_serving(f"127.0.0.1:{port}", timeout=60, proc=proc)
        yield f"127.0.0.1:{port}"
    finally:
        stop_process(proc)


def channel(target: str) -> grpc.Channel:
    limit = 64 * 1024 * 1024
    return grpc.insecure_channel(target, options=[("grpc.max_send_message_length", limit),
                                                  ("grpc.max_receive_message_length", limit)])


# --- 1. simulation --------------------------------------------------------------------------------
@dataclass(frozen=True)
class World:
    """Catalogue, hidden preferences and the click model, shared by every policy."""

    ids: np.ndarray
    vectors: np.ndarray  # fp16, as stored
    unit: np.ndarray  # float32 unit rows, for the click model
    popularity: np.ndarray
    user_ids: list[str]
    preferences: np.ndarray
    gain: float
    threshold: float

    def click_probability(self, user: int, items: np.ndarray) -> np.ndarray:
        cos = self.unit[items] @ self.preferences[user]
        return 1.0 / (1.0 + np.exp(-self.gain * (cos - self.threshold)))


def make_world(cat: Catalogue, n_users: int, seed: int) -> World:
    users = generate_users(cat, n_users, seed=seed + 1)
    unit = normalize(cat.vectors)
    prefs = normalize(users.preferences)
    # Click model: P(click) = sigmoid(gain * (cos - threshold)), calibrated on this catalogue so that a
    # typical item (median cosine) is clicked 2% of the time and the top 1% of items at least half the time.
    sample = unit[np.random.default_rng(seed).choice(len(unit), min(4000, len(unit)), replace=False)]
    cos = sample @ prefs.T
    threshold = float(np.quantile(cos, 0.99))
    gain = float(np.log(0.02 / 0.98) / (np.median(cos) - threshold))
    return World(np.asarray(cat.media_ids, dtype=np.uint64), cat.vectors, unit,
                 np.asarray(cat.popularity, dtype=np.float32), list(users.user_ids), prefs, gain, threshold)


def simulate(world: World, policy: str, args: argparse.Namespace, seed: int, workdir: Path) -> dict:
    """Play ``args.events`` events with one policy; the candidate sets and click draws depend only on seed."""
    rounds = args.events // args.k
    cand_rng = np.random.default_rng(seed + 100)
    click_draws = np.random.default_rng(seed + 200).random((rounds, args.k))
    pick_rng = np.random.default_rng(seed + 300)
    seen: dict[int, list[int]] = {}
    rewards = np.zeros(rounds * args.k)
    expected = np.zeros(rounds * args.k)
    explored = 0
    env = {"backend": "sqlite", "sqlite_path": str(workdir / f"sim-{policy}-{seed}.sqlite3"),
           "policy": "greedy" if policy == "greedy" else "thompson"}
    if args.prior_scale is not None:
        env["prior_scale"] = str(args.prior_scale)
    with service(**env) as target, channel(target) as ch:
        stub = rl_state_service_pb2_grpc.RLStateServiceStub(ch)
        for t in tqdm(range(rounds), desc=f"simulate {policy} seed={seed}", leave=False):
            user = t % len(world.user_ids)
            cands = cand_rng.choice(len(world.ids), args.candidates, replace=False)
            if policy == "random":
                recent = set(seen.get(user, [])[-args.seen_capacity:])
                pool = [c for c in cands if c not in recent]
                picks = pick_rng.choice(pool, args.k, replace=False)
                props = np.full(args.k, 1.0 / len(pool))
            else:
                resp = stub.Rank(pb.RankRequest(
                    user_id=world.user_ids[user], context=HOMEPAGE, k=args.k,
                    candidate_media_ids=world.ids[cands].tolist(),
                    candidate_vectors=encode_batch(world.vectors[cands]),
                    popularities=world.popularity[cands].tolist(),
                ), timeout=10)
                index = {int(world.ids[c]): c for c in cands}
                picks = np.array([index[it.media_id] for it in resp.items])
                props = np.array([it.propensity for it in resp.items])
                explored += sum(it.exploration for it in resp.items)
            p = world.click_probability(user, picks)
            clicks = click_draws[t, : len(picks)] < p
            seen.setdefault(user, []).extend(int(c) for c in picks)
            sl = slice(t * args.k, t * args.k + len(picks))
            rewards[sl], expected[sl] = clicks, p
            stub.RecordFeedback(pb.RecordFeedbackRequest(events=[
                pb.FeedbackEvent(event_id=f"{policy}-{seed}-{t}-{i}", user_id=world.user_ids[user],
                                 media_id=int(world.ids[c]), reward=float(r), timestamp_unix_ms=t,
                                 context=HOMEPAGE, media_vector=encode_vector(world.vectors[c]), propensity=float(q))
                for i, (c, r, q) in enumerate(zip(picks, clicks, props, strict=True))
            ]), timeout=10)
    return {"cumulative_reward": np.cumsum(rewards), "cumulative_expected": np.cumsum(expected),
            "exploration_share": explored / (rounds * args.k)}


def run_simulation(cat: Catalogue, args: argparse.Namespace, workdir: Path) -> dict:
    policies = ("thompson", "greedy", "random")
    curves: dict[str, list[np.ndarray]] = {p: [] for p in policies}
    runs = []
    for s in range(args.seeds):
        seed = args.seed + 1000 * s
        world = make_world(cat, args.users, seed)
        run = {}
        for policy in policies:
            out = simulate(world, policy, args, seed, workdir)
            curves[policy].append(out["cumulative_reward"])
            run[policy] = {"reward": float(out["cumulative_reward"][-1]),
                           "expected_reward": float(out["cumulative_expected"][-1]),
                           "exploration_share": out["exploration_share"]}
        run["lift_over_greedy"] = run["thompson"]["reward"] / run["greedy"]["reward"] - 1
        run["lift_over_random"] = run["thompson"]["reward"] / run["random"]["reward"] - 1
        print(f"seed {seed}: " + ", ".join(f"{p} {run[p]['reward']:.0f}" for p in policies)
              + f"; lift over greedy {run['lift_over_greedy']:+.1%}, over random {run['lift_over_random']:+.1%}")
        runs.append({"seed": seed, "click_gain": world.gain, "click_threshold": world.threshold, **run})
    median = {p: float(np.median([r[p]["reward"] for r in runs])) for p in policies}
    return {
        "events": args.events, "users": args.users, "items": args.items, "candidates": args.candidates,
        "k": args.k, "seeds": args.seeds, "runs": runs, "median_reward": median,
        "median_lift_over_greedy": float(np.median([r["lift_over_greedy"] for r in runs])),
        "median_lift_over_random": float(np.median([r["lift_over_random"] for r in runs])),
        "curves": {p: np.median(np.stack(c), axis=0) for p, c in curves.items()},
    }


# --- 2. ingestion and 3. latency on PostgreSQL ---------------------------------------------------
async def ingest(target: str, cat: Catalogue, batch: int, users_per_batch: int, clients: int,
                 seconds: float) -> dict:
    """Concurrent clients send distinct batches for ``seconds``; events acknowledged per second."""
    vectors = [encode_vector(v) for v in cat.vectors[:1000]]
    ids = cat.media_ids[:1000]
    per_user = batch // users_per_batch
    done = retries = 0
    latencies: list[float] = []
    stop_at = time.perf_counter() + seconds

    async def client(c: int, stub: rl_state_service_pb2_grpc.RLStateServiceStub) -> None:
        nonlocal done, retries
        n = 0
        rng = np.random.default_rng(c)
        while time.perf_counter() < stop_at:
            users = rng.choice(10_000, users_per_batch, replace=False)
            events = [pb.FeedbackEvent(event_id=f"ing-{batch}-{c}-{n}-{i}", user_id=f"user-{users[i // per_user]}",
                                       media_id=int(ids[j]), reward=float(i % 2), timestamp_unix_ms=n,
                                       context=HOMEPAGE, media_vector=vectors[j])
                      for i, j in enumerate(rng.integers(0, len(vectors), batch))]
            request = pb.RecordFeedbackRequest(events=events)
            start = time.perf_counter()
            while True:  # what a client does with UNAVAILABLE: back off, resend (the events are idempotent)
                try:
                    resp = await stub.RecordFeedback(request, timeout=30)
                    break
                except grpc.aio.AioRpcError as err:
                    if err.code() != grpc.StatusCode.UNAVAILABLE:
                        raise
                    retries += 1
                    await asyncio.sleep(0.05)
            latencies.append(time.perf_counter() - start)
            done += resp.applied_count
            n += 1

    started = time.perf_counter()
    async with grpc.aio.insecure_channel(target, options=[("grpc.max_send_message_length", 64 << 20)]) as ch:
        stub = rl_state_service_pb2_grpc.RLStateServiceStub(ch)
        await asyncio.gather(*(client(c, stub) for c in range(clients)))
    elapsed = time.perf_counter() - started
    return {"batch": batch, "users_per_batch": users_per_batch, "clients": clients, "seconds": elapsed,
            "events": done, "events_per_second": done / elapsed, "unavailable_retries": retries,
            "batch_latency_p50_ms": 1000 * float(np.percentile(latencies, 50)),
            "batch_latency_p99_ms": 1000 * float(np.percentile(latencies, 99))}


def latency(target: str, cat: Catalogue, calls: int, candidates: int) -> dict:
    """One call in flight; client-side wall time per call."""
    rng = np.random.default_rng(7)
    out: dict[str, dict] = {}
    with channel(target) as ch:
        stub = rl_state_service_pb2_grpc.RLStateServiceStub(ch)
        # users that exist: written by the ingestion runs (user-0 .. user-9999)
        user_ids = [f"user-{u}" for u in rng.integers(0, 10_000, calls)]
        times = []
        for u in tqdm(user_ids, desc="GetUserState", leave=False):
            start = time.perf_counter()
            stub.GetUserState(pb.GetUserStateRequest(user_id=u), timeout=10)
            times.append(time.perf_counter() - start)
        out["get_user_state"] = _percentiles(times)
        times, policies = [], {}
        for u in tqdm(user_ids, desc="Rank", leave=False):
            cands = rng.choice(len(cat.media_ids), candidates, replace=False)
            request = pb.RankRequest(user_id=u, context=HOMEPAGE, k=20,
                                     candidate_media_ids=np.asarray(cat.media_ids)[cands].tolist(),
                                     candidate_vectors=encode_batch(cat.vectors[cands]),
                                     popularities=np.asarray(cat.popularity)[cands].tolist())
            start = time.perf_counter()
            resp = stub.Rank(request, timeout=10)
            times.append(time.perf_counter() - start)
            policies[resp.policy] = policies.get(resp.policy, 0) + 1
        out["rank"] = {**_percentiles(times), "candidates": candidates, "k": 20, "policies": policies}
    return out


def _percentiles(seconds: list[float]) -> dict:
    ms = 1000 * np.asarray(seconds)
    return {"calls": len(ms), "p50_ms": float(np.percentile(ms, 50)), "p99_ms": float(np.percentile(ms, 99))}


def run_postgres(cat: Catalogue, args: argparse.Namespace) -> dict:
    with PostgresServer() as pg, service(backend="postgres", postgres_dsn=pg.dsn, pool_max_size="8") as target:
        runs = [asyncio.run(ingest(target, cat, b, u, args.clients, args.ingest_seconds))
                for b, u in ((500, 50), (100, 10), (1000, 1000))]
        for r in runs:
            print(f"ingest batch={r['batch']} users/batch={r['users_per_batch']} clients={r['clients']}: "
                  f"{r['events_per_second']:.0f} events/s")
        lat = latency(target, cat, args.latency_calls, args.candidates)
        print(f"GetUserState p50 {lat['get_user_state']['p50_ms']:.2f} ms p99 {lat['get_user_state']['p99_ms']:.2f}"
              f" ms; Rank({args.candidates}) p50 {lat['rank']['p50_ms']:.2f} ms p99 {lat['rank']['p99_ms']:.2f} ms")
    return {"ingest": runs, "latency": lat}


# --- output ---------------------------------------------------------------------------------------
def plot(sim: dict | None, pg: dict | None, path: Path) -> None:
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    if sim is not None:
        ax = axes[0]
        window = 1000
        for policy, curve in sim["curves"].items():
            x = np.arange(1, len(curve) + 1)
            ax.plot(x, curve, label=f"{policy} ({curve[-1]:.0f})")
        ax.set(title=f"Cumulative reward (median of {sim['seeds']} seeds)", xlabel="feedback events",
               ylabel="clicks")
        ax.legend()
        inset = ax.inset_axes([0.55, 0.1, 0.4, 0.3])
        for curve in sim["curves"].values():
            rate = (curve[window:] - curve[:-window]) / window
            inset.plot(np.arange(window, len(curve)), rate)
        inset.set_title(f"click rate, last {window} events", fontsize=8)
        inset.tick_params(labelsize=7)
    if pg is not None:
        ax = axes[1]
        labels = [f"batch {r['batch']}\n{r['users_per_batch']} users" for r in pg["ingest"]]
        ax.bar(labels, [r["events_per_second"] for r in pg["ingest"]], color="tab:blue")
        ax.axhline(10_000, color="tab:red", linestyle="--", label="seed target 10,000/s")
        ax.set(title="Feedback ingestion on PostgreSQL 15 (fsync on)", ylabel="events / s")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--items", type=int, default=20_000, help="catalogue size")
    parser.add_argument("--users", type=int, default=50, help="simulated users")
    parser.add_argument("--events", type=int, default=20_000, help="feedback events per policy")
    parser.add_argument("--candidates", type=int, default=200, help="candidates per Rank")
    parser.add_argument("--k", type=int, default=5, help="slate size (events per round)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--seeds", type=int, default=3, help="simulation repetitions (medians reported)")
    parser.add_argument("--seen-capacity", type=int, default=200, help="must match GMCO_RL_STATE_SEEN_CAPACITY")
    parser.add_argument("--prior-scale", type=float, default=None,
                        help="GMCO_RL_STATE_PRIOR_SCALE for the Thompson run (default: the service's)")
    parser.add_argument("--clients", type=int, default=4, help="concurrent ingestion clients")
    parser.add_argument("--ingest-seconds", type=float, default=10.0)
    parser.add_argument("--latency-calls", type=int, default=1000)
    parser.add_argument("--skip-simulation", action="store_true")
    parser.add_argument("--skip-postgres", action="store_true")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()

    args.out.mkdir(parents=True, exist_ok=True)
    cat = generate_catalogue(args.items, dim=1024, n_clusters=100, seed=args.seed)
    result: dict = {"command": "python bench/bench_rl.py " + " ".join(sys.argv[1:]),
                    "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
                    "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    sim = pg = None
    with tempfile.TemporaryDirectory(prefix="gmco-bench-rl-") as tmp:
        if not args.skip_simulation:
            sim = run_simulation(cat, args, Path(tmp))
            result["simulation"] = {k: v for k, v in sim.items() if k != "curves"}
    if not args.skip_postgres:
        pg = run_postgres(cat, args)
        result["postgres"] = pg
    (args.out / "rl_state.json").write_text(json.dumps(result, indent=2))
    plot(sim, pg, args.out / "rl_state.png")
    print(f"wrote {args.out / 'rl_state.json'} and {args.out / 'rl_state.png'}")


if __name__ == "__main__":
    main()
