"""The umbrella chart and each subchart lint, render, and validate against the Kubernetes API schemas."""

from __future__ import annotations

import kubernetes_validate
import pytest

CRD_GROUP = "monitoring.coreos.com/"


@pytest.mark.parametrize("production", [False, True], ids=["default", "production"])
def test_umbrella_chart_lints_strict(chart, production):
    args = ["lint", "--strict", str(chart.path)] + (["-f", str(chart.production)] if production else [])
    result = chart.run(*args)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("name", ["router", "shard", "cache", "ontology", "rl-state", "envoy"])
def test_each_subchart_lints_and_renders_alone(chart, name):
    result = chart.run("lint", "--strict", str(chart.subchart(name)))
    assert result.returncode == 0, result.stdout + result.stderr
    objects = chart.render(chart.subchart(name))
    assert objects.workloads(), f"{name} rendered no workload"
    assert {objects.component(o) for o in objects} == {name}


@pytest.mark.parametrize("version", ["1.28.0", "1.31.0"])
def test_rendered_objects_validate_strictly(rendered, version):
    checked = 0
    for obj in rendered:
        if obj["apiVersion"].startswith(CRD_GROUP):
            continue  # Prometheus Operator CRDs: no Kubernetes schema (checked in test_deploy_monitoring)
        kubernetes_validate.validate(obj, version, strict=True)
        checked += 1
    assert checked > 30


def test_condition_disables_a_subchart(chart):
    objects = chart.render(sets=["shard.enabled=false", "envoy.enabled=false"])
    names = {objects.component(o) for o in objects if "app.kubernetes.io/name" in o["metadata"]["labels"]}
    assert names == {"router", "cache", "ontology", "rl-state"}


def test_prometheus_operator_objects_only_where_the_crd_exists(chart, default_objects):
    plain = chart.render()
    assert not [o for o in plain if o["apiVersion"].startswith(CRD_GROUP)]
    monitors = default_objects.of_kind("ServiceMonitor")
    assert {default_objects.component(m) for m in monitors} == set(chart.subcharts)
    assert len(default_objects.of_kind("PrometheusRule")) == 1


def test_every_pod_is_scraped_through_exactly_one_service(rendered):
    """ServiceMonitors select Services labelled gmco.io/scrape; a pod behind two of them would count twice."""
    scraped = [s for s in rendered.of_kind("Service") if s["metadata"]["labels"].get("gmco.io/scrape") == "true"]
    for workload in rendered.workloads():
        pod_labels = workload["spec"]["template"]["metadata"]["labels"]
        hits = [s for s in scraped if s["spec"]["selector"].items() <= pod_labels.items()]
        assert len(hits) == 1, f"{workload['metadata']['name']} is behind {len(hits)} scraped Services"
        assert "metrics" in {p["name"] for p in hits[0]["spec"]["ports"]}
