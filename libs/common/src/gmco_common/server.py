"""Build and run a ``grpc.aio`` server the same way in every service.

Attached in order: tracing, metrics, auth (when a token is set) and error-mapping interceptors; the
standard health service; reflection (both ``grpc.reflection.v1`` and ``v1alpha``, so that grpcurl and
``buf curl`` of any age can list and call the services); message-size limits; optional TLS/mTLS; a
Prometheus endpoint on a separate port; and a graceful drain on SIGTERM (health goes NOT_SERVING, then
``server.stop(grace)``).

Health is the conjunction of named conditions: a service is SERVING only while every condition it set
holds ("loading" while a shard loads its data, "log-tailer" while the tailer runs, "cuda", ...).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection, reflection_pb2
from grpc_reflection.v1alpha._async import ReflectionServicer
from prometheus_client import start_http_server

from gmco_common.config import ServerSettings
from gmco_common.interceptors import (
    AuthInterceptor,
    ErrorInterceptor,
    MetricsInterceptor,
    RequestContextInterceptor,
)
from gmco_common.tracing import configure_tracing, server_interceptor, service_name_of

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Registration:
    """A servicer, the generated ``add_XServicer_to_server`` function and the service's full name."""

    add_to_server: Callable[[Any, grpc.aio.Server], None]
    servicer: Any
    full_name: str


class Health:
    """The standard health service, driven by named conditions: SERVING only while every condition holds.

    It exists before the server does, so that a service's background supervisor and servicer can be wired
    with it; :func:`start_server` registers it."""

    def __init__(self) -> None:
        self.servicer = health.aio.HealthServicer()
        self._conditions: dict[str, bool] = {}
        self._services: list[str] = []

    @property
    def serving(self) -> bool:
        return all(self._conditions.values())

    @property
    def conditions(self) -> dict[str, bool]:
        return dict(self._conditions)

    def register(self, service_names: Sequence[str]) -> None:
        self._services = list(service_names)

    async def set_condition(self, name: str, ok: bool) -> None:
        self._conditions[name] = ok
        await self._publish()

    async def _publish(self) -> None:
        status = health_pb2.HealthCheckResponse.SERVING if self.serving else health_pb2.HealthCheckResponse.NOT_SERVING
        for service in ("", *self._services):
            await self.servicer.set(service, status)

    async def enter_graceful_shutdown(self) -> None:
        await self.servicer.enter_graceful_shutdown()


@dataclass
class RunningServer:
    server: grpc.aio.Server
    health: Health
    port: int
    service_names: list[str]
    metrics_port: int | None = None
    _stopping: asyncio.Event = field(default_factory=asyncio.Event)
    # The pieces ``start`` wired (store, backend, servicer, ...), by name: for tests and admin tools.
    parts: dict[str, Any] = field(default_factory=dict)

    @property
    def serving(self) -> bool:
        return self.health.serving

    async def set_condition(self, name: str, ok: bool) -> None:
        """Record one health condition; SERVING only while every condition holds."""
        await self.health.set_condition(name, ok)

    async def set_serving(self, serving: bool) -> None:
        await self.set_condition("server", serving)

    def request_stop(self) -> None:
        self._stopping.set()

    async def wait_for_stop(self) -> None:
        await self._stopping.wait()

    async def drain(self, grace: float) -> None:
        """Stop taking new work: report NOT_SERVING, let in-flight RPCs finish for ``grace`` seconds.

        Calls that reached the transport just before the signal are still dispatched during a short
        settle period (at most half the grace) before the server stops accepting; load balancers see
        NOT_SERVING meanwhile and send new calls elsewhere.
        """
        await self.health.enter_graceful_shutdown()
        await asyncio.sleep(min(1.0, grace / 2))
        await self.server.stop(grace)


def server_options(settings: ServerSettings) -> list[tuple[str, Any]]:
    return [
        ("grpc.max_receive_message_length", settings.max_message_bytes),
        ("grpc.max_send_message_length", settings.max_message_bytes),
        ("grpc.so_reuseport", 0),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.min_ping_interval_without_data_ms", 5000),
    ]


def _credentials(settings: ServerSettings) -> grpc.ServerCredentials | None:
    if settings.tls_cert_file is None or settings.tls_key_file is None:
        return None
    pair = (settings.tls_key_file.read_bytes(), settings.tls_cert_file.read_bytes())
    if settings.tls_client_ca_file is not None:
        return grpc.ssl_server_credentials(
            [pair], root_certificates=settings.tls_client_ca_file.read_bytes(), require_client_auth=True
        )
    return grpc.ssl_server_credentials([pair])


_metrics_started: dict[int, int] = {}


def start_metrics(settings: ServerSettings) -> int | None:
    """Serve Prometheus metrics on ``metrics_port`` (once per process); None when disabled."""
    if settings.metrics_port == 0:
        return None
    if settings.metrics_port not in _metrics_started:
        server, _thread = start_http_server(settings.metrics_port, addr=settings.host)
        _metrics_started[settings.metrics_port] = server.server_address[1]
    return _metrics_started[settings.metrics_port]


REFLECTION_V1 = "grpc.reflection.v1.ServerReflection"


def _enable_reflection(names: Sequence[str], server: grpc.aio.Server) -> None:
    """Reflection under both names. v1 is v1alpha with another package name and the same messages on the
    wire, so one servicer answers both."""
    listed = [*names, reflection.SERVICE_NAME, REFLECTION_V1]
    reflection.enable_server_reflection(listed, server)
    servicer = ReflectionServicer(listed)
    rpc = grpc.stream_stream_rpc_method_handler(
        servicer.ServerReflectionInfo,
        request_deserializer=reflection_pb2.ServerReflectionRequest.FromString,
        response_serializer=reflection_pb2.ServerReflectionResponse.SerializeToString)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(REFLECTION_V1, {"ServerReflectionInfo": rpc}),))


async def start_server(
    settings: ServerSettings,
    registrations: Sequence[Registration],
    extra_interceptors: Sequence[grpc.aio.ServerInterceptor] = (),
    stack: contextlib.AsyncExitStack | None = None,
    health_state: Health | None = None,
) -> RunningServer:
    """Create, bind and start a server; returns once it accepts calls. Health is ``health_state`` (a service
    that sets conditions of its own, "loading" say, passes the one it wired), else a fresh one; it is
    SERVING once no condition is false. With ``stack``, the server stops when the stack unwinds (after a
    drain it is stopped already)."""
    configure_tracing(settings, service_name_of([reg.full_name for reg in registrations]))
    tracing = server_interceptor()
    interceptors: list[grpc.aio.ServerInterceptor] = [*([tracing] if tracing else []), RequestContextInterceptor(),
                                                      MetricsInterceptor()]
    if settings.auth_token:
        interceptors.append(AuthInterceptor(settings.auth_token))
    interceptors.extend(extra_interceptors)
    interceptors.append(ErrorInterceptor())
    server = grpc.aio.server(interceptors=interceptors, options=server_options(settings))
    names = []
    for reg in registrations:
        reg.add_to_server(reg.servicer, server)
        names.append(reg.full_name)
    health_state = health_state or Health()
    health_state.register(names)
    health_pb2_grpc.add_HealthServicer_to_server(health_state.servicer, server)
    _enable_reflection([*names, health.SERVICE_NAME], server)
    address = f"{settings.host}:{settings.port}"
    creds = _credentials(settings)
    port = server.add_secure_port(address, creds) if creds else server.add_insecure_port(address)
    if port == 0:
        raise RuntimeError(f"could not bind {address}; is the port in use?")
    await server.start()
    if stack is not None:
        stack.push_async_callback(server.stop, 0)
    running = RunningServer(server, health_state, port, names, metrics_port=start_metrics(settings))
    await running.set_serving(True)
    log.info("serving %s on %s:%s (tls=%s, auth=%s)", ",".join(names), settings.host, port,
             creds is not None, bool(settings.auth_token))
    return running


async def serve_until_signal(running: RunningServer, grace: float) -> None:
    """Run until SIGTERM or SIGINT, then drain gracefully."""
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, running.request_stop)
    await running.wait_for_stop()
    log.info("signal received: draining for up to %.1fs", grace)
    await running.drain(grace)
    log.info("stopped")
