"""gmco plan: the planner's arithmetic on small hand-checked cases, what it reads from results files, and
that the Helm values it writes render with the chart (whose values.schema.json helm enforces)."""

from __future__ import annotations

import json
import math
import subprocess
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner
from gmco_cli.capacity import (
    COLUMN_BYTES_PER_ROW,
    LIST_ENTRY_OVERHEAD_BYTES,
    LIST_ITEM_BYTES,
    FanoutCost,
    Figure,
    Inputs,
    Measured,
    Profile,
    helm_values,
    load_measured,
    make_plan,
    model_hit_ratio,
)
from gmco_cli.plan import plan

ROOT = Path(__file__).resolve().parents[3]
HELM = ROOT / ".tools" / "bin" / "helm"
CHART = ROOT / "deploy" / "helm" / "gmco"


def test_hit_ratio_of_one_user_is_x_over_one_plus_x() -> None:
    # one user at 1 req/s, TTL 3 s: 3 hits per miss on average -> 3/4
    assert model_hit_ratio(1.0, 1, 1.1, 3.0, 0.0) == pytest.approx(0.75)
    # with feedback p = 0.5: hits per miss = (1-p)/p (1 - e^(-x p)) = 1 - e^-1.5
    h = 1 - math.exp(-1.5)
    assert model_hit_ratio(1.0, 1, 1.1, 3.0, 0.5) == pytest.approx(h / (1 + h))


def test_hit_ratio_weights_users_by_their_zipf_share() -> None:
    # two users, Zipf(1): shares 2/3 and 1/3 of 3 req/s, TTL 1 s -> x = 2 and 1
    expected = (2 * (2 / 3) + 1 * (1 / 2)) / 3
    assert model_hit_ratio(3.0, 2, 1.0, 1.0, 0.0) == pytest.approx(expected)


PROFILE = Profile("cpu-test", "hnsw", rows=100, dim=8, qps=Figure(50.0, "test", True), batch=1,
                  p99_ms=Figure(2.0, "test", True), cores=2, gpus=0,
                  bytes_per_row=Figure(2 * 8 + COLUMN_BYTES_PER_ROW, "raw", False), hardware="test")
MEASURED = Measured({"cpu-test": PROFILE}, FanoutCost(5.0, 0.5, (1, 2, 4, 8, 16), "test"),
                    router_cpu_ms_per_hit=Figure(1.0, "test", True), redis_ops_per_master=Figure(1000.0, "t", True),
                    cache_service_qps=Figure(200.0, "t", True))


def test_plan_arithmetic_on_a_small_case() -> None:
    inp = Inputs(items=1000, dim=8, peak_rps=1000, users=10_000, hit_ratio=0.9, ttl_seconds=300, replicas=2,
                 k=10, utilisation=0.5, router_cores=1.0)
    p = make_plan(inp, PROFILE, MEASURED)
    assert p.miss_rps == pytest.approx(100)
    assert p.shards == 10  # 1000 items / 100 rows
    assert p.replicas_for_load == 4 and p.replicas == 4  # 100 q/s over 50 q/s x 0.5
    assert p.router_cpu_ms_per_miss.value == pytest.approx(10.0)  # 5 + 0.5 x 10 shards
    assert p.router_cpu_ms_per_miss.measured  # 10 shards is inside the measured range (N <= 16)
    # 100 misses x 10 ms + 900 hits x 1 ms = 1.9 core-seconds/s over 0.5 of one core -> 4 routers
    assert p.routers == 4
    # 1100 ops/s over 1000 x 0.5 per master -> 3 (also the cluster minimum)
    assert p.redis_masters == 3
    assert p.redis_live_lists == 10_000  # min(users, 100 misses/s x 300 s)
    assert p.redis_bytes == 10_000 * (LIST_ENTRY_OVERHEAD_BYTES + LIST_ITEM_BYTES * 10)
    assert p.cache_replicas == 11  # 1100 / (200 x 0.5)
    assert p.memory_per_shard_bytes == 100 * (16 + COLUMN_BYTES_PER_ROW)
    assert p.shard_cores == 10 * 4 * 2 and p.gpus == 0
    assert p.seed_formula_gpus == 1  # ceil(100 / 200 x 1.5)
    assert not p.notes


def test_plan_flags_extrapolation_and_a_p99_it_cannot_meet() -> None:
    inp = Inputs(items=10_000, dim=16, peak_rps=1000, users=100, hit_ratio=0.5, p99_ms=1.0, utilisation=0.5)
    p = make_plan(inp, PROFILE, MEASURED)
    assert p.shards == 100
    assert not p.router_cpu_ms_per_miss.measured  # 100 shards > the measured 16
    assert p.replica_qps.value == pytest.approx(25.0)  # scaled by dim 8/16, and said so
    assert any("extrapolated" in n for n in p.notes)
    assert any("dim" in n for n in p.notes)
    assert any("cannot meet" in n for n in p.notes)


def test_another_shard_size_scales_qps_and_says_so() -> None:
    inp = Inputs(items=1000, dim=8, peak_rps=1000, users=10_000, hit_ratio=0.9, utilisation=0.5, rows_per_shard=200)
    p = make_plan(inp, PROFILE, MEASURED)
    assert p.shards == 5 and p.rows_per_shard == 200
    assert p.replica_qps.value == pytest.approx(25.0) and not p.replica_qps.measured  # 50 x 100/200
    assert p.replicas_for_load == 8  # 100 / (25 x 0.5)
    assert p.router_cpu_ms_per_miss.value == pytest.approx(7.5)  # 5 + 0.5 x 5: fewer shards, less fan-out
    assert p.memory_per_shard_bytes == 200 * (16 + COLUMN_BYTES_PER_ROW)
    assert any("not measured" in n for n in p.notes)


def test_model_is_used_when_no_hit_ratio_is_given() -> None:
    inp = Inputs(items=1000, dim=8, peak_rps=1.0, users=1, ttl_seconds=3.0)
    p = make_plan(inp, PROFILE, MEASURED)
    assert p.hit_ratio.value == pytest.approx(0.75) and not p.hit_ratio.measured


def _results(tmp: Path) -> Path:
    (tmp / "fanout.json").write_text(json.dumps({"per_n": {
        "1": {"router_cpu_ms_per_miss": 5.5}, "2": {"router_cpu_ms_per_miss": 6.0},
        "4": {"router_cpu_ms_per_miss": 7.0}}}))
    (tmp / "bench_shard.json").write_text(json.dumps({
        "machine": {"cpus": 4, "machine": "x86_64"}, "items": 1000, "dim": 8,
        "backends": {"hnsw": {"hnsw_m": 16, "chosen_ef": 64, "sweep": [{"ef": 64, "p99_ms_b1": 0.7}],
                              "grpc": {"sat_qps_b1": 400.0, "sat_qps_b32": 900.0}}}}))
    (tmp / "k6_local_stack.json").write_text(json.dumps({"phases": [{
        "name": "hit_max", "wall_seconds": 10.0, "cpu_cores": {"router-0": 0.5, "router-1": 0.5, "envoy": 1.0},
        "metrics": {"iterations": {"count": 5000}}}]}))
    return tmp


def test_load_measured_reads_the_results_files(tmp_path: Path) -> None:
    (tmp_path / "shard_scale.json").write_text(json.dumps({
        "machine": {"cpus": 2}, "rows": 1_000_000, "dim": 1024, "backend": "ivf", "qps_batch1_per_core": 300.0,
        "qps_b32_grpc": 1500.0, "rss_bytes": 2_500_000_000, "writes": {"p99_ms_without_writes": 4.0}}))
    m = load_measured(_results(tmp_path))
    ivf = m.profiles["cpu-ivf-1m"]
    assert ivf.qps.value == 300.0 and ivf.cores == 1 and ivf.p99_ms.value == 4.0
    assert ivf.bytes_per_row.value == 2500.0 and ivf.bytes_per_row.measured
    assert m.profiles["cpu-ivf-1m-b32"].qps.value == 1500.0 and m.profiles["cpu-ivf-1m-b32"].cores == 2
    assert not any("shard_scale" in x for x in m.missing)
    assert m.fanout is not None
    assert m.fanout.per_shard_ms == pytest.approx(0.5) and m.fanout.base_ms == pytest.approx(5.0)
    hnsw = m.profiles["cpu-hnsw-1k"]
    assert hnsw.qps.value == 400.0 and hnsw.cores == 4 and hnsw.p99_ms.value == 0.7
    assert m.profiles["cpu-hnsw-1k-b32"].batch == 32
    assert hnsw.bytes_per_row.value == 6 * 8 + 8 * 16 + COLUMN_BYTES_PER_ROW and not hnsw.bytes_per_row.measured
    assert m.router_cpu_ms_per_hit.value == pytest.approx(2.0)  # 1 router core x 10 s / 5000 hits
    assert any("GPU" in x for x in m.missing)  # no bench_gpu.json: no GPU profile, and it says so
    assert m.redis_ops_per_master is None


def test_cli_prints_sources_and_writes_values(tmp_path: Path) -> None:
    (tmp_path / "r").mkdir()
    results = _results(tmp_path / "r")
    out = tmp_path / "values.yaml"
    res = CliRunner().invoke(plan, ["--results", str(results), "--items", "10000", "--dim", "8", "--peak-rps", "500",
                                    "--users", "1000", "--hit-ratio", "0.8", "--values-out", str(out)])
    assert res.exit_code == 0, res.output
    assert "shards               10 of 1,000 rows" in res.output
    assert "measured: bench_shard.json: backends.hnsw.grpc.sat_qps_b1" in res.output
    values = yaml.safe_load(out.read_text())
    assert values["global"]["shards"]["count"] == 10
    assert values["shard"]["gpu"]["count"] == 0 and values["shard"]["indexBackend"] == "hnsw"
    bad = CliRunner().invoke(plan, ["--results", str(results), "--profile", "no-such"])
    assert bad.exit_code != 0 and "cpu-hnsw-1k" in bad.output


@pytest.mark.skipif(not HELM.is_file(), reason="helm is not installed (make helm)")
def test_helm_values_render_and_validate(tmp_path: Path) -> None:
    inp = Inputs(items=300, dim=8, peak_rps=1000, users=1000, hit_ratio=0.9, utilisation=0.5)
    p = make_plan(inp, PROFILE, MEASURED)
    path = tmp_path / "values.yaml"
    path.write_text(yaml.safe_dump(helm_values(p, inp, PROFILE)))
    result = subprocess.run([str(HELM), "template", "gmco", str(CHART), "-f", str(path)], capture_output=True,
                            text=True, timeout=120, check=False)
    assert result.returncode == 0, result.stderr  # helm enforces every values.schema.json
    objects = [o for o in yaml.safe_load_all(result.stdout) if o]
    shards = [o for o in objects if o["kind"] == "StatefulSet" and o["metadata"]["labels"].get(
        "app.kubernetes.io/name") == "shard"]
    assert len(shards) == p.shards == 3
    assert {o["spec"]["replicas"] for o in shards} == {p.replicas}
    router = next(o for o in objects if o["kind"] == "HorizontalPodAutoscaler" and "router" in o["metadata"]["name"])
    assert router["spec"]["minReplicas"] == p.routers
    pod = shards[0]["spec"]["template"]["spec"]
    shard_container = next(c for c in pod["containers"] if c["name"] == "shard")
    assert "nvidia.com/gpu" not in shard_container["resources"].get("limits", {})
    assert "nvidia.com/gpu.present" not in (pod.get("nodeSelector") or {})
