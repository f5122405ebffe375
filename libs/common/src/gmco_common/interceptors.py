"""Server interceptors, attached in this order: tracing (the standard OpenTelemetry gRPC interceptor,
:mod:`gmco_common.tracing`; only while a tracer provider records spans), request context, metrics, auth, error mapping.

Each wraps the unary handler of a method. Health checks and reflection pass through request context and
auth untouched so that probes need no token.
"""

from __future__ import annotations

import hmac
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

import grpc
from prometheus_client import Counter, Histogram

from gmco_common.context import REQUEST_ID_HEADER, deadline_var, new_request_id, request_id_var
from gmco_common.errors import GmcoError

log = logging.getLogger(__name__)

PROBE_PREFIXES = ("/grpc.health.v1.", "/grpc.reflection.")

GRPC_HANDLED = Counter(
    "grpc_server_handled_total",
    "RPCs completed on the server, by method and status code.",
    ["grpc_service", "grpc_method", "grpc_code"],
)
GRPC_LATENCY = Histogram(
    "grpc_server_handling_seconds",
    "Time to handle an RPC on the server, by method.",
    ["grpc_service", "grpc_method"],
    buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0),
)

Behavior = Callable[[Any, grpc.aio.ServicerContext], Awaitable[Any]]


def _split(method: str) -> tuple[str, str]:
    _, service, name = method.split("/", 2) if method.count("/") >= 2 else ("", "", method)
    return service, name


def _wrap(handler: grpc.RpcMethodHandler | None, wrapper: Callable[[Behavior], Behavior]):
    """Return ``handler`` with its unary-unary behaviour wrapped; other kinds pass through."""
    if handler is None or handler.unary_unary is None:
        return handler
    return grpc.unary_unary_rpc_method_handler(
        wrapper(handler.unary_unary),
        request_deserializer=handler.request_deserializer,
        response_serializer=handler.response_serializer,
    )


def _request_id(context: grpc.aio.ServicerContext) -> str:
    for key, value in context.invocation_metadata() or ():
        if key == REQUEST_ID_HEADER and isinstance(value, str) and value:
            return value
    return new_request_id()


class _PerMethod:
    """Wrapped handlers built once per method, not once per call: ``intercept_service`` runs for every RPC,
    and building a method handler with its closures (and looking up its metric children) each time was a
    measurable part of a router's CPU per cache hit. Only methods the server has are kept."""

    def __init__(self) -> None:
        self._built: dict[str, tuple[grpc.RpcMethodHandler, grpc.RpcMethodHandler | None]] = {}

    def get(self, method: str, handler: grpc.RpcMethodHandler | None,
            build: Callable[[], grpc.RpcMethodHandler | None]) -> grpc.RpcMethodHandler | None:
        if handler is None:
            return None
        known = self._built.get(method)
        if known is not None and known[0] is handler:
            return known[1]
        wrapped = build()
        self._built[method] = (handler, wrapped)
        return wrapped


class _PerMethodInterceptor(grpc.aio.ServerInterceptor):
    """An interceptor that wraps each method's unary behaviour once (``wrap``), through :class:`_PerMethod`;
    with ``skip_probes``, health checks and reflection pass through unwrapped."""

    skip_probes = False

    def __init__(self) -> None:
        self._handlers = _PerMethod()

    def wrap(self, method: str, behavior: Behavior) -> Behavior:
        raise NotImplementedError

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        method = handler_call_details.method
        if self.skip_probes and method.startswith(PROBE_PREFIXES):
            return handler
        return self._handlers.get(method, handler, lambda: _wrap(handler, lambda b: self.wrap(method, b)))


class RequestContextInterceptor(_PerMethodInterceptor):
    """Sets the request id (from metadata, else a new one) and the deadline for the handler's calls."""

    skip_probes = True

    def wrap(self, method: str, behavior: Behavior) -> Behavior:
        async def with_context(request, context):
            request_id_var.set(_request_id(context))
            remaining = context.time_remaining()
            deadline_var.set(time.monotonic() + remaining if remaining is not None else None)
            return await behavior(request, context)

        return with_context


class MetricsInterceptor(_PerMethodInterceptor):
    """Counts handled RPCs by status code and records handling time."""

    def wrap(self, method: str, behavior: Behavior) -> Behavior:
        service, name = _split(method)
        latency = GRPC_LATENCY.labels(service, name)
        handled_ok = GRPC_HANDLED.labels(service, name, grpc.StatusCode.OK.name)

        async def measured(request, context):
            start = time.perf_counter()
            code = grpc.StatusCode.OK
            try:
                return await behavior(request, context)
            except BaseException:
                code = context.code() or grpc.StatusCode.UNKNOWN
                raise
            finally:
                if isinstance(code, int):  # aio returns the raw enum value on some versions
                    code = grpc.StatusCode.OK
                latency.observe(time.perf_counter() - start)
                (handled_ok if code is grpc.StatusCode.OK else GRPC_HANDLED.labels(service, name, code.name)).inc()

        return measured


class AuthInterceptor(grpc.aio.ServerInterceptor):
    """Requires ``authorization: Bearer <token>``; health and reflection stay open for probes."""

    def __init__(self, token: str) -> None:
        self._expected = f"Bearer {token}".encode()

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler_call_details.method.startswith(PROBE_PREFIXES):
            return handler
        given = ""
        for key, value in handler_call_details.invocation_metadata or ():
            if key == "authorization":
                given = value if isinstance(value, str) else value.decode()
        if hmac.compare_digest(given.encode(), self._expected):
            return handler

        def wrapper(_behavior: Behavior) -> Behavior:
            async def deny(request, context):
                await context.abort(
                    grpc.StatusCode.UNAUTHENTICATED,
                    "missing or wrong bearer token: send metadata 'authorization: Bearer <token>'",
                )

            return deny

        return _wrap(handler, wrapper)


class ErrorInterceptor(_PerMethodInterceptor):
    """Maps domain exceptions to status codes. Anything unexpected is INTERNAL with no exception text."""

    def wrap(self, method: str, behavior: Behavior) -> Behavior:
        async def mapped(request, context):
            try:
                return await behavior(request, context)
            except GmcoError as exc:
                await context.abort(exc.code, exc.message)
            except grpc.aio.AbortError:
                raise
            except TimeoutError:
                await context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, "deadline exceeded")
            except grpc.aio.AioRpcError as exc:
                # A downstream call failed and the handler did not handle it.
                code = exc.code()
                if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                    await context.abort(code, f"a dependency answered {code.name}")
                log.exception("unhandled downstream error in %s", method)
                await context.abort(grpc.StatusCode.INTERNAL, f"internal error (request {request_id_var.get()})")
            except Exception:
                log.exception("unhandled error in %s", method)
                await context.abort(grpc.StatusCode.INTERNAL, f"internal error (request {request_id_var.get()})")

        return mapped
