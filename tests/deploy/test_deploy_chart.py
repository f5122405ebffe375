"""The umbrella chart and each subchart lint, render, and validate against the Kubernetes API schemas."""

from __future__ import annotations

import subprocess
import sys

import kubernetes_validate
import pytest
import yaml

CRD_GROUP = "monitoring.coreos.com/"
LAYOUTS = ("default", "production", "dev", "in-cluster", "external-secrets")


@pytest.mark.parametrize("layout", LAYOUTS)
def test_umbrella_chart_lints_strict(chart, layout):
    values, sets = chart.layout_values(layout)
    args = ["lint", "--strict", str(chart.path)]
    for path in values:
        args += ["-f", str(path)]
    for item in sets:
        args += ["--set", item]
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


def test_chart_declares_the_kubernetes_it_needs(chart):
    """StatefulSet pods carry apps.kubernetes.io/pod-index (the shards' replica id) from 1.28 on."""
    assert yaml.safe_load((chart.path / "Chart.yaml").read_text())["kubeVersion"] == ">=1.28.0-0"
    result = chart.run("template", "gmco", str(chart.path), "--kube-version", "1.27.0")
    assert result.returncode != 0 and "kubeVersion" in result.stderr
    assert chart.run("template", "gmco", str(chart.path), "--kube-version", "1.28.0").returncode == 0


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
    for workload in rendered.service_workloads():
        pod_labels = workload["spec"]["template"]["metadata"]["labels"]
        hits = [s for s in scraped if s["spec"]["selector"].items() <= pod_labels.items()]
        assert len(hits) == 1, f"{workload['metadata']['name']} is behind {len(hits)} scraped Services"
        assert "metrics" in {p["name"] for p in hits[0]["spec"]["ports"]}


def test_chart_readme_is_generated_from_the_values(chart):
    """README.md (helm show readme) is deploy/helm/chart_readme.py's output: no drift from the @params."""
    script = chart.root / "deploy" / "helm" / "chart_readme.py"
    result = subprocess.run([sys.executable, str(script), "--check"], check=False, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    readme = chart.run("show", "readme", str(chart.path))
    assert readme.returncode == 0 and "| `shard.demoCatalogue.items` |" in readme.stdout
