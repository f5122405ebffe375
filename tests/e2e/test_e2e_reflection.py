"""Every service of the local stack answers server reflection under both protocol names,
``grpc.reflection.v1`` (what current grpcurl and buf curl try first) and ``grpc.reflection.v1alpha``, and
can describe its own service from it (what a gRPC CLI needs to build a request)."""

from __future__ import annotations

import grpc
import pytest
from gmco_stack.stack import Stack
from google.protobuf import descriptor_pb2
from grpc_reflection.v1alpha import reflection_pb2

pytestmark = pytest.mark.e2e

PROTOCOLS = ("grpc.reflection.v1", "grpc.reflection.v1alpha")


def _ask(target: str, protocol: str, request: reflection_pb2.ServerReflectionRequest
         ) -> reflection_pb2.ServerReflectionResponse:
    # v1 is v1alpha renamed: the same messages on the wire, so v1alpha's classes serve both.
    with grpc.insecure_channel(target) as channel:
        call = channel.stream_stream(f"/{protocol}.ServerReflection/ServerReflectionInfo",
                                     request_serializer=reflection_pb2.ServerReflectionRequest.SerializeToString,
                                     response_deserializer=reflection_pb2.ServerReflectionResponse.FromString)
        return next(iter(call(iter([request]), timeout=5)))


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_every_service_lists_and_describes_itself(stack: Stack, protocol: str) -> None:
    for name, svc in stack.services.items():
        if name == "envoy":
            continue
        listed = _ask(svc.target, protocol, reflection_pb2.ServerReflectionRequest(list_services=""))
        names = {s.name for s in listed.list_services_response.service}
        assert svc.health_service in names and "grpc.health.v1.Health" in names, (name, protocol)
        assert set(PROTOCOLS) <= {n.removesuffix(".ServerReflection") for n in names}, (name, names)
        found = _ask(svc.target, protocol,
                     reflection_pb2.ServerReflectionRequest(file_containing_symbol=svc.health_service))
        files = [descriptor_pb2.FileDescriptorProto.FromString(b)
                 for b in found.file_descriptor_response.file_descriptor_proto]
        services = {f"{f.package}.{s.name}" for f in files for s in f.service}
        assert svc.health_service in services, (name, protocol)


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_envoy_passes_reflection_through_to_a_router(stack: Stack, protocol: str) -> None:
    listed = _ask(stack.envoy_target, protocol, reflection_pb2.ServerReflectionRequest(list_services=""))
    assert "gmco.router.v1.RecommendationService" in {s.name for s in listed.list_services_response.service}
