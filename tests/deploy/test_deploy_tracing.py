"""Tracing through the chart: global.tracing turns on every GMC-O service's OTLP exporter
(GMCO_<SVC>_OTEL_EXPORTER=otlp and OTEL_EXPORTER_OTLP_ENDPOINT), and the NetworkPolicies let exactly those
services reach the collector's peers on its port. Off by default; otlp without an endpoint is refused."""

from __future__ import annotations

import json

import pytest

PYTHON_SERVICES = ("router", "shard", "cache", "ontology", "rl-state")
ENDPOINT = "http://otel-collector.observability:4317"
COLLECTOR = {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "observability"}}}


@pytest.fixture(scope="module")
def traced(chart, tmp_path_factory):
    values = tmp_path_factory.mktemp("tracing") / "tracing.yaml"
    values.write_text(json.dumps({"global": {"tracing": {"exporter": "otlp", "endpoint": ENDPOINT,
                                                         "networkPolicyTo": [COLLECTOR]}}}))
    return chart.render(values=[chart.dev, values])


def env_configmaps(objects) -> dict[str, dict[str, str]]:
    return {c["metadata"]["name"].removeprefix("gmco-").removesuffix("-env"): c["data"]
            for c in objects.of_kind("ConfigMap") if c["metadata"]["name"].endswith("-env")}


def collector_rules(policy) -> list[dict]:
    return [r for r in policy["spec"].get("egress", []) if r.get("to") == [COLLECTOR]]


def test_every_service_exports_to_the_collector(traced):
    maps = env_configmaps(traced)
    assert set(PYTHON_SERVICES) <= set(maps)
    for name in PYTHON_SERVICES:
        prefix = "GMCO_" + name.upper().replace("-", "_") + "_"
        assert maps[name][prefix + "OTEL_EXPORTER"] == "otlp", name
        assert maps[name]["OTEL_EXPORTER_OTLP_ENDPOINT"] == ENDPOINT, name


def test_only_the_services_may_reach_the_collector_on_its_port(traced):
    policies = {p["metadata"]["name"].removeprefix("gmco-"): p for p in traced.of_kind("NetworkPolicy")}
    for name in PYTHON_SERVICES:
        (rule,) = collector_rules(policies[name])
        assert rule["ports"] == [{"port": 4317, "protocol": "TCP"}], name
    assert not collector_rules(policies["envoy"])


def test_tracing_is_off_by_default(rendered):
    for name, data in env_configmaps(rendered).items():
        assert "OTEL_EXPORTER_OTLP_ENDPOINT" not in data, name
        assert all(v == "none" for k, v in data.items() if k.endswith("_OTEL_EXPORTER")), name


def test_otlp_without_an_endpoint_is_refused(chart):
    assert "global.tracing.endpoint" in chart.rejection(values=[chart.dev], sets=["global.tracing.exporter=otlp"])
