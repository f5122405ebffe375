"""Security end to end: bearer tokens on every service, mTLS between the router and the shards.

A stack of its own: every service has ``GMCO_<SERVICE>_AUTH_TOKEN`` set (one token, which the router
also presents to its dependencies), and the shard serves TLS and requires a client certificate that the
router presents (``StackConfig.shard_tls``, certificates from :mod:`gmco_testing.tls`). Callers through
Envoy without the token are refused before any handler runs; with it, the whole request path works.
"""

from __future__ import annotations

import urllib.error
import urllib.request
from collections.abc import Iterator

import grpc
import pytest
import yaml
from gmco.common.v1 import common_pb2
from gmco.router.v1 import router_service_pb2 as rpb
from gmco.router.v1 import router_service_pb2_grpc
from gmco.shard.v1 import shard_service_pb2 as spb
from gmco.shard.v1 import shard_service_pb2_grpc
from gmco_stack.stack import Stack, StackConfig, tls_credentials
from gmco_testing.metrics import metric_sum
from gmco_testing.procs import grpc_serving
from gmco_testing.tls import make_certificates

pytestmark = pytest.mark.e2e

TOKEN = "e2e-secret-token"
SERVICES = ("ROUTER", "SHARD", "CACHE", "ONTOLOGY", "RL_STATE")
CONTEXT = common_pb2.RequestContext(surface=common_pb2.SURFACE_HOMEPAGE, region="US", device="smart_tv")


@pytest.fixture(scope="module")
def secure_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    certs = make_certificates(tmp_path_factory.mktemp("certs"))
    config = StackConfig(items=3000, dim=32, shards=1, replicas=1, routers=1, index_backend="exact",
                         run_dir=tmp_path_factory.mktemp("secure"), base_port=None, start_timeout=180,
                         env={f"GMCO_{s}_AUTH_TOKEN": TOKEN for s in SERVICES}, shard_tls=certs)
    with Stack(config) as running:
        running.certs = certs
        yield running


@pytest.fixture(scope="module")
def router(secure_stack: Stack) -> Iterator[router_service_pb2_grpc.RecommendationServiceStub]:
    with grpc.insecure_channel(secure_stack.envoy_target) as channel:
        yield router_service_pb2_grpc.RecommendationServiceStub(channel)


def _handled(stack: Stack) -> float:
    """Recommend requests that reached the router's handler (its stage histogram counts them)."""
    return metric_sum(stack.routers[0].metrics_url, "gmco_router_stage_seconds_count")


def _recommend(router, metadata=None) -> rpb.RecommendResponse:
    return router.Recommend(rpb.RecommendRequest(user_id="sec-user", k=5, skip_cache=True, context=CONTEXT),
                            timeout=10, metadata=metadata)


def test_callers_without_the_token_are_refused_before_any_handler(secure_stack, router) -> None:
    before = _handled(secure_stack)
    for metadata in (None, [("authorization", "Bearer wrong")], [("authorization", TOKEN)]):
        with pytest.raises(grpc.RpcError) as err:
            _recommend(router, metadata)
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED, err.value
        assert "bearer token" in err.value.details()
    assert _handled(secure_stack) == before, "a refused call reached the handler"


def test_with_the_token_the_whole_path_works_over_mtls(secure_stack, router) -> None:
    resp = _recommend(router, [("authorization", f"Bearer {TOKEN}")])
    # not degraded: the shard answered over mTLS, and cache, ontology and rl_state took the router's token
    assert resp.items and not resp.degraded, list(resp.degraded_components)


def test_the_shard_refuses_plaintext_and_clients_without_a_certificate(secure_stack) -> None:
    shard = secure_stack.shard_services[0]
    certs = secure_stack.certs
    assert not grpc_serving(shard.target, timeout=2), "the shard answered plaintext"
    no_client_cert = grpc.ssl_channel_credentials(certs.ca.read_bytes())
    assert not grpc_serving(shard.target, timeout=2, credentials=no_client_cert), "mTLS not required"
    assert grpc_serving(shard.target, timeout=2, credentials=tls_credentials(certs))
    with grpc.secure_channel(shard.target, tls_credentials(certs)) as channel:  # a certificate, no token
        with pytest.raises(grpc.RpcError) as err:
            shard_service_pb2_grpc.ShardServiceStub(channel).GetStats(spb.GetStatsRequest(), timeout=5)
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED


def test_envoy_admin_listens_on_loopback_only(secure_stack) -> None:
    config = yaml.safe_load(secure_stack.envoy_config)
    assert config["admin"]["address"]["socket_address"]["address"] == "127.0.0.1"
    # probes and Prometheus get /ready and /stats/prometheus from the read-only listener, nothing else
    read_only = f"http://127.0.0.1:{secure_stack.envoy_metrics_port}"
    with urllib.request.urlopen(f"{read_only}/ready", timeout=5) as resp:
        assert resp.status == 200
    with urllib.request.urlopen(f"{read_only}/stats/prometheus", timeout=5) as resp:
        assert "envoy_cluster_upstream_rq" in resp.read().decode()
    for path in ("/quitquitquit", "/logging?level=trace", "/clusters"):
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(urllib.request.Request(f"{read_only}{path}", method="POST"), timeout=5)
        assert err.value.code == 404
