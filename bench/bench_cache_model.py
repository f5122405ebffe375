"""Recommendation-cache hit ratio at the seed design's scale, from a model checked against simulation.

The model. Each user u sends requests as a Poisson stream of rate lambda_u (Zipf(s) shares of the
total rate over U users), one context per user. A miss stores the list for TTL seconds from that
moment (a hit does not extend it); with probability p a request is followed by feedback that bumps
the user's state version, so the next request misses. Capacity is unlimited (a Redis Cluster sized
for the working set). Each "cycle" of a user starts with a miss; the j-th request after it hits when
it comes within the TTL and none of the j earlier requests bumped the version, so

    E[hits per cycle] = h = (1 - p)/p * (1 - exp(-lambda*TTL*p))   (h = lambda*TTL when p = 0)
    hit ratio         = sum_u lambda_u * h_u/(1 + h_u) / sum_u lambda_u

The check. The same question is simulated request by request with the service's own TTL LRU
(bench_cache.simulate: 1M users, 5,000 req/s, capacity 1M, the first half of the stream as warm-up)
and compared with the model at the same parameters.

The grid. Total rate x TTL x feedback probability at 10M users (the seed's user count; its peak is
166,000 req/s and its list TTL 300 s), plus the Zipf exponent's effect at the seed's peak.
Writes bench/results/bench_cache_model.{json,png}.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_cache import TTL_SECONDS, USERS_ZIPF, ZIPF_S, simulate, zipf_users
from common import plot_path, write_json
from gmco_cli.capacity import model_hit_ratio  # the model lives with the planner (gmco plan) that uses it

SEED_USERS = 10_000_000
SEED_PEAK_RATE = 166_000
TARGET = 0.95


def check(requests: int, rate: float) -> list[dict]:
    users = zipf_users(requests, np.random.default_rng(7))
    rows = []
    for feedback in (0.0, 0.05):
        t = time.perf_counter()
        simulated = simulate(users, USERS_ZIPF, rate, feedback, seed=11)
        modelled = model_hit_ratio(rate, USERS_ZIPF, ZIPF_S, TTL_SECONDS, feedback)
        rows.append({"feedback": feedback, "simulated": simulated, "model": modelled,
                     "simulation_seconds": time.perf_counter() - t})
        print(f"check p={feedback}: simulated {simulated:.4f}, model {modelled:.4f}")
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--check-requests", type=int, default=3_000_000,
                    help="simulated requests for the check (half warm-up); 0 skips the check")
    ap.add_argument("--check-rate", type=float, default=5_000, help="requests/s in the check")
    ap.add_argument("--users", type=int, default=SEED_USERS)
    ap.add_argument("--rates", type=float, nargs="+", default=[5_000, 16_600, 50_000, SEED_PEAK_RATE, 500_000])
    ap.add_argument("--ttls", type=float, nargs="+", default=[300, 900, 3600])
    ap.add_argument("--feedback", type=float, nargs="+", default=[0.0, 0.05])
    ap.add_argument("--zipf", type=float, nargs="+", default=[1.0, 1.1, 1.2], help="exponents for the sensitivity row")
    a = ap.parse_args()

    out: dict = {"model": "Poisson per user, Zipf shares, TTL from fill, feedback bumps the version, no eviction",
                 "users": a.users, "zipf_s": ZIPF_S, "check": [], "grid": [], "zipf_sensitivity": []}
    if a.check_requests:
        out["check"] = check(a.check_requests, a.check_rate)
    for ttl in a.ttls:
        for feedback in a.feedback:
            for rate in a.rates:
                ratio = model_hit_ratio(rate, a.users, ZIPF_S, ttl, feedback)
                out["grid"].append({"rate_per_s": rate, "ttl_seconds": ttl, "feedback": feedback, "hit_ratio": ratio})
                print(f"rate {rate:>9,.0f}/s  ttl {ttl:>5.0f} s  p {feedback:.2f}: {ratio:.3f}")
    for s in a.zipf:
        for feedback in a.feedback:
            ratio = model_hit_ratio(SEED_PEAK_RATE, a.users, s, TTL_SECONDS, feedback)
            out["zipf_sensitivity"].append({"zipf_s": s, "feedback": feedback, "hit_ratio": ratio,
                                            "rate_per_s": SEED_PEAK_RATE, "ttl_seconds": TTL_SECONDS})
            print(f"seed peak, ttl {TTL_SECONDS} s, zipf {s}, p {feedback:.2f}: {ratio:.3f}")
    print("wrote", write_json("bench_cache_model", out))

    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for ttl in a.ttls:
        for feedback, style in zip(a.feedback, ("-", "--", ":", "-."), strict=False):
            pts = [g for g in out["grid"] if g["ttl_seconds"] == ttl and g["feedback"] == feedback]
            ax.plot([g["rate_per_s"] for g in pts], [g["hit_ratio"] for g in pts], style, marker="o",
                    label=f"TTL {ttl:.0f} s, feedback p {feedback}")
    for i, c in enumerate(out["check"]):
        ax.plot([a.check_rate], [c["simulated"]], "kx", ms=9, label="check, 1M users: simulated" if not i else None)
        ax.plot([a.check_rate], [c["model"]], "k+", ms=12, label="check, 1M users: model" if not i else None)
    ax.axhline(TARGET, color="grey", lw=0.8, label="seed target 0.95")
    ax.axvline(SEED_PEAK_RATE, color="grey", lw=0.8, ls=":", label="seed peak 166k req/s")
    ax.set(xscale="log", xlabel="total requests/s", ylabel="hit ratio",
           title=f"model: Zipf({ZIPF_S}) over {a.users:,} users")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(plot_path("bench_cache_model"))


if __name__ == "__main__":
    main()
