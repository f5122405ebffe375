"""The chart's Envoy config is the local stack's, byte for byte, and Envoy accepts it."""

from __future__ import annotations

import subprocess

import pytest
import yaml
from gmco_stack.envoy import EnvoyParams, load_template, render_envoy_config

ENVOY = "envoy"
ROUTER_HOST = "gmco-router-headless.gmco.svc.cluster.local"


def chart_config(objects) -> str:
    return objects.find("ConfigMap", "gmco-envoy")["data"]["envoy.yaml"]


def stack_config(**overrides) -> str:
    params = EnvoyParams(listen_port=8080, admin_port=9902, routers=((ROUTER_HOST, 50050),),
                         listen_address="0.0.0.0", metrics_address="0.0.0.0", metrics_port=9901,
                         router_discovery="STRICT_DNS", **overrides)
    return render_envoy_config(load_template(), params)


def test_default_config_is_the_local_stacks(default_objects):
    assert chart_config(default_objects) == stack_config()


def test_tuned_config_is_the_local_stacks(chart, tmp_path):
    sets = {"ringMinSize": 2048, "ringMaxSize": 16384, "retries": 3, "routeTimeoutSeconds": 0.25,
            "healthIntervalSeconds": 2.5, "healthTimeoutSeconds": 0.1, "healthNoTrafficIntervalSeconds": 30,
            "healthUnhealthyThreshold": 4, "healthHealthyThreshold": 2, "outlierConsecutive5xx": 7,
            "outlierIntervalSeconds": 1.5, "outlierBaseEjectionSeconds": 45, "maxRequests": 123456,
            "maxRetries": 77}
    values = tmp_path / "tuned.yaml"  # a file, not --set, which would turn 0.25 into a string
    values.write_text(yaml.safe_dump({"envoy": {"proxy": sets}}))
    objects = chart.render(values=[values])
    expected = stack_config(ring_min=2048, ring_max=16384, retries=3, route_timeout=0.25, health_interval=2.5,
                            health_timeout=0.1, health_no_traffic_interval=30, health_unhealthy_threshold=4,
                            health_healthy_threshold=2, outlier_consecutive_5xx=7, outlier_interval=1.5,
                            outlier_base_ejection=45, max_requests=123456, max_retries=77)
    assert chart_config(objects) == expected


def test_config_hashes_users_onto_the_router_headless_service(default_objects):
    config = yaml.safe_load(chart_config(default_objects))
    (cluster,) = [c for c in config["static_resources"]["clusters"] if c["name"] == "routers"]
    assert cluster["lb_policy"] == "RING_HASH" and cluster["type"] == "STRICT_DNS"
    assert cluster["ring_hash_lb_config"] == {"minimum_ring_size": 1024, "maximum_ring_size": 8192}
    assert cluster["health_checks"][0]["grpc_health_check"]["service_name"] == "gmco.router.v1.RecommendationService"
    assert "outlier_detection" in cluster
    (endpoint,) = cluster["load_assignment"]["endpoints"][0]["lb_endpoints"]
    assert endpoint["endpoint"]["address"]["socket_address"] == {"address": ROUTER_HOST, "port_value": 50050}
    route = config["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"][
        "route_config"]["virtual_hosts"][0]["routes"][0]["route"]
    assert route["hash_policy"] == [{"header": {"header_name": "x-user-id"}}]
    assert "retry_policy" in route
    headless = default_objects.find("Service", "gmco-router-headless")
    assert headless["spec"]["clusterIP"] == "None"


@pytest.mark.parametrize("production", [False, True], ids=["default", "production"])
def test_envoy_validates_the_config(chart, tmp_path, default_objects, production_objects, production):
    config = tmp_path / "envoy.yaml"
    config.write_text(chart_config(production_objects if production else default_objects))
    result = subprocess.run([str(chart.root / ".venv" / "bin" / ENVOY), "--mode", "validate", "-c", str(config)],
                            check=False, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert "OK" in result.stdout + result.stderr


def test_admin_is_on_loopback_and_only_ready_and_metrics_are_exposed(default_objects):
    """The admin interface can stop Envoy: loopback only. Probes and Prometheus use a read-only listener."""
    config = yaml.safe_load(chart_config(default_objects))
    assert config["admin"]["address"]["socket_address"]["address"] == "127.0.0.1"
    (exposed,) = [lst for lst in config["static_resources"]["listeners"] if lst["name"] == "admin_read_only"]
    assert exposed["address"]["socket_address"] == {"address": "0.0.0.0", "port_value": 9901}
    hcm = exposed["filter_chains"][0]["filters"][0]["typed_config"]
    routes = hcm["route_config"]["virtual_hosts"][0]["routes"]
    assert sorted(r["match"]["path"] for r in routes) == ["/ready", "/stats/prometheus"]
    assert all(r["route"]["cluster"] == "admin" for r in routes)
