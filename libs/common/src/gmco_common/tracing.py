"""OpenTelemetry setup. Spans come from the interceptors; exporters are chosen by settings."""

from __future__ import annotations

import logging

from opentelemetry import trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter

from gmco_common.config import ConfigError, ServerSettings

log = logging.getLogger(__name__)
_configured = False


def configure_tracing(settings: ServerSettings, service_name: str = "gmco") -> None:
    global _configured
    if _configured or settings.otel_exporter == "none":
        return
    provider = TracerProvider(resource=Resource.create({"service.name": settings.instance_id or service_name}))
    if settings.otel_exporter == "console":
        provider.add_span_processor(BatchSpanProcessor(ConsoleSpanExporter()))
    else:
        try:
            from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
        except ImportError:
            raise ConfigError(
                "*_OTEL_EXPORTER=otlp needs the package opentelemetry-exporter-otlp-proto-grpc; install it"
            ) from None
        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    trace.set_tracer_provider(provider)
    _configured = True
