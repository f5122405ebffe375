"""The Envoy template renders to the configuration we mean, and the real Envoy accepts it."""

from __future__ import annotations

import subprocess

import pytest
import yaml
from gmco_stack.envoy import EnvoyParams, load_template, render_envoy_config
from gmco_stack.stack import ENVOY_BIN

PARAMS = EnvoyParams(18080, 19901, (("127.0.0.1", 17101), ("127.0.0.1", 17102)), ring_min=2048, ring_max=4096)


def _cluster(doc: dict) -> dict:
    (cluster,) = [c for c in doc["static_resources"]["clusters"] if c["name"] == "routers"]
    return cluster


def test_render_ring_hash_health_checks_retries_and_http2() -> None:
    doc = yaml.safe_load(render_envoy_config(load_template(), PARAMS))
    cluster = _cluster(doc)
    assert cluster["lb_policy"] == "RING_HASH"
    assert cluster["ring_hash_lb_config"] == {"minimum_ring_size": 2048, "maximum_ring_size": 4096}
    (check,) = cluster["health_checks"]
    assert check["grpc_health_check"]["service_name"] == "gmco.router.v1.RecommendationService"
    assert check["no_traffic_interval"] == "1s"
    assert "consecutive_5xx" in cluster["outlier_detection"]
    options = cluster["typed_extension_protocol_options"]["envoy.extensions.upstreams.http.v3.HttpProtocolOptions"]
    assert "http2_protocol_options" in options["explicit_http_config"]
    ports = [e["endpoint"]["address"]["socket_address"]["port_value"]
             for e in cluster["load_assignment"]["endpoints"][0]["lb_endpoints"]]
    assert ports == [17101, 17102]
    hcm = doc["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    route = hcm["route_config"]["virtual_hosts"][0]["routes"][0]["route"]
    assert route["hash_policy"] == [{"header": {"header_name": "x-user-id"}}]
    assert "unavailable" in route["retry_policy"]["retry_on"].split(",")


def test_render_rejects_bad_params() -> None:
    with pytest.raises(ValueError):
        EnvoyParams(1, 2, ())
    with pytest.raises(ValueError):
        EnvoyParams(1, 2, (("a", 1),), router_discovery="EDS")
    with pytest.raises(KeyError):
        render_envoy_config("port: ${UNKNOWN}", PARAMS)


@pytest.mark.integration
@pytest.mark.parametrize("discovery", ["STATIC", "STRICT_DNS"])
def test_real_envoy_validates_the_rendered_config(tmp_path, discovery: str) -> None:
    routers = PARAMS.routers if discovery == "STATIC" else (("gmco-router.gmco.svc", 50050),)
    params = EnvoyParams(PARAMS.listen_port, PARAMS.admin_port, routers, router_discovery=discovery)
    path = tmp_path / "envoy.yaml"
    path.write_text(render_envoy_config(load_template(), params))
    result = subprocess.run([str(ENVOY_BIN), "--mode", "validate", "-c", str(path), "--disable-hot-restart"],
                            check=False, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "OK" in result.stdout + result.stderr
