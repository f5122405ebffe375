"""`helm test <release>`: the standard gRPC health check, then one Recommend, both through Envoy.

Run by the chart's test Pod (templates/tests/recommend.yaml) with the router image's Python, which has
grpcio and the GMC-O stubs:  python -c "<this file>" <envoy host:port> <user id> <min items>
GMCO_TEST_TOKEN, when set, is sent as the bearer token (the health check needs none).
"""

import os
import sys

import grpc
from gmco.common.v1 import common_pb2
from gmco.router.v1 import router_service_pb2 as pb
from gmco.router.v1 import router_service_pb2_grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

target, user, min_items = sys.argv[1], sys.argv[2], int(sys.argv[3])
metadata = [("x-user-id", user)]
if os.environ.get("GMCO_TEST_TOKEN"):
    metadata.append(("authorization", "Bearer " + os.environ["GMCO_TEST_TOKEN"]))

with grpc.insecure_channel(target) as channel:
    health = health_pb2_grpc.HealthStub(channel).Check(
        health_pb2.HealthCheckRequest(service="gmco.router.v1.RecommendationService"), timeout=10)
    print(f"health via {target}: {health_pb2.HealthCheckResponse.ServingStatus.Name(health.status)}")
    if health.status != health_pb2.HealthCheckResponse.SERVING:
        sys.exit("the routers are not SERVING")
    context = common_pb2.RequestContext(surface=common_pb2.SURFACE_HOMEPAGE, region="US", device="smart_tv")
    reply = router_service_pb2_grpc.RecommendationServiceStub(channel).Recommend(
        pb.RecommendRequest(user_id=user, context=context, k=10), metadata=metadata, timeout=20)
    print(f"Recommend({user}): {len(reply.items)} items from {reply.router_id}, degraded={reply.degraded}")
    if len(reply.items) < min_items:
        sys.exit(f"expected at least {min_items} items")
