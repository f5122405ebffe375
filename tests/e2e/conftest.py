"""The local stack, started once per session with a small catalogue, driven through Envoy."""

from __future__ import annotations

from collections.abc import Iterator

import grpc
import pytest
from gmco.router.v1 import router_service_pb2_grpc
from gmco_stack.stack import Stack, StackConfig

E2E_ITEMS = 5000
E2E_DIM = 64


@pytest.fixture(scope="session")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    config = StackConfig(items=E2E_ITEMS, dim=E2E_DIM, shards=2, routers=2, index_backend="ivf",
                         run_dir=tmp_path_factory.mktemp("stack"), base_port=None, start_timeout=180)
    with Stack(config) as running:
        yield running


@pytest.fixture(scope="session")
def envoy(stack: Stack) -> Iterator[router_service_pb2_grpc.RecommendationServiceStub]:
    with grpc.insecure_channel(stack.envoy_target) as channel:
        yield router_service_pb2_grpc.RecommendationServiceStub(channel)
