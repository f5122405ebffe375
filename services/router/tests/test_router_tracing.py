"""Tracing with the standard gRPC instrumentation, seen by an in-memory exporter: one Recommend is one
trace, from the router's SERVER span through its CLIENT calls and the fan-out to the shards' SERVER
spans; health checks are not traced; JSON log lines carry the trace and span ids; the resource names the
service and the instance. The dependencies are the harness's fakes, served by the same
``gmco_common.server.start_server`` (and so the same interceptors) as the real services."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Iterator

import pytest
from gmco.common.v1 import common_pb2
from gmco.router.v1 import router_service_pb2 as pb
from gmco_common.logging import JsonFormatter
from gmco_common.tracing import service_name_of, service_resource
from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind

RECOMMEND = "/gmco.router.v1.RecommendationService/Recommend"
SEARCH = "/gmco.shard.v1.ShardService/Search"
GET_USER_STATE = "/gmco.rl_state.v1.RLStateService/GetUserState"


@pytest.fixture(scope="module")
def spans() -> Iterator[InMemorySpanExporter]:
    """Every span this process finishes while the module runs. The provider is the process's one (a test
    process has none until this installs it; the interceptors' tracers resolve it per span)."""
    provider = trace.get_tracer_provider()
    if not isinstance(provider, TracerProvider):
        provider = TracerProvider(resource=service_resource("gmco-test", "pytest"))
        trace.set_tracer_provider(provider)
    exporter = InMemorySpanExporter()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    yield exporter
    exporter.shutdown()


async def _finished(spans: InMemorySpanExporter, name: str, kind: SpanKind) -> list[ReadableSpan]:
    """The finished spans named ``name`` (the router's SERVER span ends just after its reply is sent)."""
    for _ in range(100):
        found = [s for s in spans.get_finished_spans() if s.name == name and s.kind == kind]
        if found:
            return found
        await asyncio.sleep(0.02)
    raise AssertionError(f"no {kind.name} span {name}: {[s.name for s in spans.get_finished_spans()]}")


def _ancestors(span: ReadableSpan, by_id: dict[int, ReadableSpan]) -> list[int]:
    chain = []
    while span.parent is not None and span.parent.span_id in by_id:
        span = by_id[span.parent.span_id]
        chain.append(span.context.span_id)
    return chain


async def test_one_recommend_is_one_trace_through_the_router_and_every_shard(h, spans):
    spans.clear()
    reply = await h.stub.Recommend(pb.RecommendRequest(
        user_id="u-trace", k=5,
        context=common_pb2.RequestContext(surface=common_pb2.SURFACE_HOMEPAGE, region="US", device="smart_tv")),
        timeout=5)
    assert len(reply.items) == 5 and not reply.cache_hit

    (router,) = await _finished(spans, RECOMMEND, SpanKind.SERVER)
    trace_id = router.context.trace_id
    searches = await _finished(spans, SEARCH, SpanKind.SERVER)
    assert len(searches) == len(h.shards)  # one replica of every shard, each a span of this trace
    assert {s.context.trace_id for s in searches} == {trace_id}
    in_trace = {s.context.span_id: s for s in spans.get_finished_spans() if s.context.trace_id == trace_id}
    for search in searches:
        assert router.context.span_id in _ancestors(search, in_trace)
    # A call through a gmco_common channel: the router's CLIENT span, and rl_state's SERVER span under it.
    (client,) = [s for s in in_trace.values() if s.name == GET_USER_STATE and s.kind == SpanKind.CLIENT]
    (server,) = [s for s in in_trace.values() if s.name == GET_USER_STATE and s.kind == SpanKind.SERVER]
    assert client.parent.span_id == router.context.span_id and server.parent.span_id == client.context.span_id
    assert router.attributes["rpc.system"] == "grpc" and router.attributes["rpc.method"] == "Recommend"


async def test_health_checks_are_not_traced(h, spans):
    spans.clear()
    await asyncio.sleep(3 * h.settings.health_interval_seconds)  # the router checks every replica's health
    assert h.shards[0][0].switch.calls.get("Search", 0) == 0
    assert not [s.name for s in spans.get_finished_spans() if "grpc.health" in s.name]


def test_log_lines_carry_the_trace_and_span_ids(spans):
    formatter = JsonFormatter("gmco-test")
    record = logging.LogRecord("gmco.test", logging.INFO, __file__, 1, "hello %s", ("trace",), None)
    with trace.get_tracer(__name__).start_as_current_span("work") as span:
        inside = json.loads(formatter.format(record))
    context = span.get_span_context()
    assert inside["trace_id"] == format(context.trace_id, "032x") and len(inside["trace_id"]) == 32
    assert inside["span_id"] == format(context.span_id, "016x") and inside["msg"] == "hello trace"
    outside = json.loads(formatter.format(record))
    assert "trace_id" not in outside and "span_id" not in outside


def test_the_resource_names_the_service_and_the_instance():
    names = ["gmco.rl_state.v1.RLStateService", "grpc.health.v1.Health"]
    assert service_name_of(names) == "gmco-rl-state"
    assert service_name_of(["gmco.router.v1.RecommendationService"]) == "gmco-router"
    attributes = service_resource("gmco-shard", "gmco-shard-3-1").attributes
    assert attributes["service.name"] == "gmco-shard" and attributes["service.instance.id"] == "gmco-shard-3-1"
