"""``gmco plan``: shards, replicas, routers, Redis and Helm values from measured figures (gmco_cli.capacity)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

DEFAULT_RESULTS = Path(__file__).resolve().parents[4] / "bench" / "results"


@click.command("plan", context_settings={"show_default": True})
@click.option("--items", type=click.IntRange(min=1), default=100_000_000, help="catalogue size")
@click.option("--dim", type=click.IntRange(min=1), default=1024, help="embedding dimension")
@click.option("--peak-rps", type=click.FloatRange(min=0), default=166_000, help="peak requests/s")
@click.option("--users", type=click.IntRange(min=1), default=10_000_000, help="distinct users")
@click.option("--zipf", "zipf_s", type=click.FloatRange(min=0), default=1.1, help="Zipf exponent of user activity")
@click.option("--hit-ratio", type=click.FloatRange(0, 1), default=None,
              help="a measured cache hit ratio (instead of the cache model)")
@click.option("--ttl", "ttl_seconds", type=click.FloatRange(min=0), default=300.0, help="recommendation TTL, s")
@click.option("--feedback", type=click.FloatRange(0, 1), default=0.0,
              help="probability that a request is followed by feedback (which invalidates the user's lists)")
@click.option("--p99-ms", type=click.FloatRange(min=0), default=100.0, help="p99 target")
@click.option("--replicas", type=click.IntRange(min=1), default=2, help="at least this many replicas per shard")
@click.option("--k", type=click.IntRange(min=1), default=10, help="items per recommendation list")
@click.option("--utilisation", type=click.FloatRange(0.05, 1), default=0.6,
              help="planned fraction of each measured capacity")
@click.option("--rows-per-shard", type=click.IntRange(min=1), default=None,
              help="shard size (default: the profile's measured one; another size scales its QPS, not measured)")
@click.option("--router-cores", type=click.FloatRange(min=0.1), default=1.0, help="cores per router pod")
@click.option("--profile", default=None, help="hardware profile (--list-profiles); default: the fastest CPU one")
@click.option("--results", type=click.Path(path_type=Path, file_okay=False), default=DEFAULT_RESULTS,
              help="directory of the benchmark JSON files")
@click.option("--list-profiles", is_flag=True, help="list the profiles the results directory yields, then exit")
@click.option("--values-out", type=click.Path(path_type=Path, dir_okay=False), default=None,
              help="write Helm values for deploy/helm/gmco here")
@click.option("--json", "as_json", is_flag=True, help="print the plan as JSON")
def plan(items: int, dim: int, peak_rps: float, users: int, zipf_s: float, hit_ratio: float | None,
         ttl_seconds: float, feedback: float, p99_ms: float, replicas: int, k: int, utilisation: float,
         router_cores: float, rows_per_shard: int | None, profile: str | None, results: Path, list_profiles: bool, values_out: Path | None,
         as_json: bool) -> None:
    """Plan capacity from this project's measured benchmark figures (usage: gmco plan [OPTIONS]).

    Every output says whether it comes from a measurement (and which file and key), from the cache model,
    or from an assumption; docs/capacity.md works through the seed's scenario.
    """
    import yaml

    from gmco_cli.capacity import Inputs, helm_values, load_measured, make_plan, report

    measured = load_measured(results)
    if list_profiles or not measured.profiles:
        for p in measured.profiles.values():
            click.echo(f"{p.name:24s} {p.backend:6s} {p.rows:>10,} x {p.dim:<5} {p.qps.value:>10,.1f} q/s at batch "
                       f"{p.batch:<3} {p.hardware}  [{p.qps.source}]")
        for m in measured.missing:
            click.echo(f"missing: {m}")
        if not measured.profiles:
            raise click.ClickException(f"no hardware profile in {results}: run make bench-shard")
        return
    if profile is None:
        cpu = [p for p in measured.profiles.values() if not p.gpus and p.batch == 1]
        chosen = max(cpu or measured.profiles.values(), key=lambda p: p.qps.value * p.rows)
    elif profile in measured.profiles:
        chosen = measured.profiles[profile]
    else:
        raise click.BadParameter(f"{profile!r} is not one of {', '.join(sorted(measured.profiles))}",
                                 param_hint="--profile")
    inputs = Inputs(items=items, dim=dim, peak_rps=peak_rps, users=users, zipf_s=zipf_s, hit_ratio=hit_ratio,
                    ttl_seconds=ttl_seconds, feedback=feedback, p99_ms=p99_ms, replicas=replicas, k=k,
                    utilisation=utilisation, router_cores=router_cores, rows_per_shard=rows_per_shard)
    result = make_plan(inputs, chosen, measured)
    values = helm_values(result, inputs, chosen)
    if values_out is not None:
        values_out.write_text("# gmco plan: " + " ".join(sys.argv[1:]) + "\n"
                              + yaml.safe_dump(values, sort_keys=False))
    if as_json:
        click.echo(json.dumps({"plan": result.to_dict(), "helm_values": values, "missing": list(measured.missing)},
                              indent=2, default=str))
    else:
        click.echo(report(result, inputs, measured))
        if values_out is not None:
            click.echo(f"  helm values          {values_out}")
