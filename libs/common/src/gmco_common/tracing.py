"""OpenTelemetry for every service: the standard gRPC instrumentation, one tracer provider per process.

- **Spans** come from ``opentelemetry-instrumentation-grpc``: :func:`server_interceptor` opens a SERVER
  span per RPC, continuing the caller's W3C trace context from the metadata; :func:`client_interceptors`
  (on every :func:`gmco_common.channels.make_channel` channel) open a CLIENT span per call and inject its
  context. Health checks and reflection are not traced (probes would drown the traces).
- **Resource**: ``service.name`` is the service (``gmco-router``, ``gmco-shard``, ...), so the pods of one
  service are one service in a tracing backend; ``service.instance.id`` is the process (``*_INSTANCE_ID``,
  the pod name in the chart; host:port by default).
- **Exporter**, by the setting ``*_OTEL_EXPORTER``: ``none`` (the default: no provider is installed, no
  tracing interceptor is attached, and tracing costs nothing; a trace does not pass through such a hop), ``console``, or ``otlp`` (gRPC to ``OTEL_EXPORTER_OTLP_ENDPOINT``; needs the
  service's ``otlp`` extra, which the images install).
- **Logs**: :func:`current_ids` gives the JSON log formatter the trace and span id of the current span.
"""

from __future__ import annotations

import logging
import socket
from collections.abc import Sequence

import grpc
from opentelemetry import trace
from opentelemetry.instrumentation.grpc import aio_client_interceptors, aio_server_interceptor
from opentelemetry.instrumentation.grpc.filters import any_of, health_check, negate, service_prefix
from opentelemetry.sdk.resources import SERVICE_INSTANCE_ID, SERVICE_NAME, Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter, SpanExporter

from gmco_common.config import ConfigError, ServerSettings

log = logging.getLogger(__name__)
_configured = False

# Health checks (probes, the router's replica checks) and reflection carry no request worth a trace.
TRACED = negate(any_of(health_check(), service_prefix("grpc.reflection.")))


def service_name_of(full_names: Sequence[str]) -> str:
    """``gmco-<service>`` from the gRPC services a server registers (``gmco.rl_state.v1.X`` -> ``gmco-rl-state``)."""
    for name in full_names:
        parts = name.split(".")
        if len(parts) >= 3 and parts[0] == "gmco":
            return "gmco-" + parts[1].replace("_", "-")
    return "gmco"


def service_resource(service: str, instance_id: str) -> Resource:
    return Resource.create({SERVICE_NAME: service, SERVICE_INSTANCE_ID: instance_id})


def _exporter(kind: str) -> SpanExporter:
    if kind == "console":
        return ConsoleSpanExporter()
    try:
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
    except ImportError:
        raise ConfigError(
            "*_OTEL_EXPORTER=otlp needs opentelemetry-exporter-otlp-proto-grpc: install the service's "
            "`otlp` extra (the images have it)"
        ) from None
    return OTLPSpanExporter()


def configure_tracing(settings: ServerSettings, service: str) -> None:
    """Install the process's tracer provider once, for ``service`` (``gmco-router``), unless the exporter
    is ``none``. A second call (a second server in one process) changes nothing."""
    global _configured
    if _configured or settings.otel_exporter == "none":
        return
    instance = settings.instance_id or f"{socket.gethostname()}:{settings.port}"
    provider = TracerProvider(resource=service_resource(service, instance))
    provider.add_span_processor(BatchSpanProcessor(_exporter(settings.otel_exporter)))
    trace.set_tracer_provider(provider)
    _configured = True
    log.info("tracing: %s spans of %s (instance %s)", settings.otel_exporter, service, instance)


def tracing_active() -> bool:
    """Whether a tracer provider that records spans is installed (by :func:`configure_tracing`, or a test's)."""
    return isinstance(trace.get_tracer_provider(), TracerProvider)


def server_interceptor() -> grpc.aio.ServerInterceptor | None:
    """A SERVER span per RPC but health and reflection (the global provider's tracer, resolved per span);
    None while no provider records spans: the instrumentation's per-call work (its method filter, no-op
    spans, context handling) cost rl_state about a sixth of its CPU per Rank with tracing off."""
    return aio_server_interceptor(filter_=TRACED) if tracing_active() else None


def client_interceptors() -> list[grpc.aio.ClientInterceptor]:
    """A CLIENT span per call, its context injected into the call's metadata (health checks left out);
    none while no provider records spans."""
    return aio_client_interceptors(filter_=TRACED) if tracing_active() else []


def current_ids() -> tuple[str, str] | None:
    """(trace id, span id) of the current span, as the 32 and 16 hex digits backends show; None outside one."""
    ctx = trace.get_current_span().get_span_context()
    if not ctx.is_valid:
        return None
    return format(ctx.trace_id, "032x"), format(ctx.span_id, "016x")
