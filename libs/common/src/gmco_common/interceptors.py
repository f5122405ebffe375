"""What every unary RPC goes through on the server, in this order: request context, metrics, auth, error
mapping. Tracing, when a tracer provider records spans, is the standard OpenTelemetry gRPC interceptor in
front of them (:mod:`gmco_common.tracing`).

The four are one wrapper, put round each method's handler once, when the service registers it
(:class:`Registrar`), not four ``grpc.aio.ServerInterceptor`` objects. A server with interceptors runs
each one's ``intercept_service`` coroutine on every call before it finds the handler; with none it looks
the handler up directly. Measured side by side that saved only a few microseconds of server CPU per call
(``docs/benchmarks.md``, "One wrapper instead of four interceptors"); it is one mechanism instead of four.

Health checks are wrapped for metrics and error mapping only: they get no request context and need no
token, so that probes work without one. Streaming methods (reflection, health Watch) pass through.
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


UNAUTHENTICATED_MESSAGE = "missing or wrong bearer token: send metadata 'authorization: Bearer <token>'"


def wrap_behavior(method: str, behavior: Behavior, auth_token: str | None, probe: bool = False) -> Behavior:
    """One coroutine per call for ``method``: sets the request id (from metadata, else a new one) and the
    deadline, requires ``authorization: Bearer <auth_token>`` when a token is set, maps domain exceptions
    to status codes (anything unexpected is INTERNAL with no exception text), and counts the call by its
    code and time. ``probe``: metrics and error mapping only."""
    service, name = _split(method)
    latency = GRPC_LATENCY.labels(service, name)
    handled_ok = GRPC_HANDLED.labels(service, name, grpc.StatusCode.OK.name)
    expected = f"Bearer {auth_token}".encode() if auth_token and not probe else None

    async def served(request, context):
        start = time.perf_counter()
        code = grpc.StatusCode.OK
        try:
            if not probe:
                request_id = given = None
                for key, value in context.invocation_metadata() or ():
                    if key == REQUEST_ID_HEADER:
                        request_id = value
                    elif key == "authorization":
                        given = value
                request_id_var.set(request_id if isinstance(request_id, str) and request_id else new_request_id())
                remaining = context.time_remaining()
                deadline_var.set(time.monotonic() + remaining if remaining is not None else None)
                if expected is not None:
                    given = given.encode() if isinstance(given, str) else (given or b"")
                    if not hmac.compare_digest(given, expected):
                        await context.abort(grpc.StatusCode.UNAUTHENTICATED, UNAUTHENTICATED_MESSAGE)
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
                down = exc.code()
                if down in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                    await context.abort(down, f"a dependency answered {down.name}")
                log.exception("unhandled downstream error in %s", method)
                await context.abort(grpc.StatusCode.INTERNAL, f"internal error (request {request_id_var.get()})")
            except Exception:
                log.exception("unhandled error in %s", method)
                await context.abort(grpc.StatusCode.INTERNAL, f"internal error (request {request_id_var.get()})")
        except BaseException:
            code = context.code() or grpc.StatusCode.UNKNOWN
            raise
        finally:
            if isinstance(code, int):  # aio returns the raw enum value on some versions
                code = grpc.StatusCode.OK
            latency.observe(time.perf_counter() - start)
            (handled_ok if code is grpc.StatusCode.OK else GRPC_HANDLED.labels(service, name, code.name)).inc()

    return served


def wrap_handler(method: str, handler: grpc.RpcMethodHandler | None, auth_token: str | None,
                 probe: bool = False) -> grpc.RpcMethodHandler | None:
    """``handler`` with its unary-unary behaviour wrapped by :func:`wrap_behavior`; other kinds pass through."""
    if handler is None or handler.unary_unary is None:
        return handler
    return grpc.unary_unary_rpc_method_handler(
        wrap_behavior(method, handler.unary_unary, auth_token, probe),
        request_deserializer=handler.request_deserializer,
        response_serializer=handler.response_serializer,
    )


class _WrappedGeneric(grpc.GenericRpcHandler):
    """A generic handler whose unary methods are wrapped, each once, the first time it is asked for them."""

    def __init__(self, inner: grpc.GenericRpcHandler, auth_token: str | None, probe: bool) -> None:
        self._inner, self._token, self._probe = inner, auth_token, probe
        self._built: dict[str, tuple[grpc.RpcMethodHandler, grpc.RpcMethodHandler]] = {}

    def service(self, handler_call_details):
        handler = self._inner.service(handler_call_details)
        if handler is None:
            return None
        method = handler_call_details.method
        known = self._built.get(method)
        if known is None or known[0] is not handler:
            known = (handler, wrap_handler(method, handler, self._token, self._probe))
            self._built[method] = known
        return known[1]


class Registrar:
    """What a generated ``add_XServicer_to_server`` is given in place of the server: it hands the server
    the servicer's handlers wrapped (:func:`wrap_handler`), both the generic handlers and the registered
    method handlers that newer generated code adds as well."""

    def __init__(self, server: grpc.aio.Server, auth_token: str | None, probe: bool = False) -> None:
        self._server, self._token, self._probe = server, auth_token, probe

    def add_generic_rpc_handlers(self, handlers) -> None:
        self._server.add_generic_rpc_handlers(tuple(_WrappedGeneric(h, self._token, self._probe) for h in handlers))

    def add_registered_method_handlers(self, service_name: str, method_handlers) -> None:
        self._server.add_registered_method_handlers(service_name, {
            name: wrap_handler(f"/{service_name}/{name}", h, self._token, self._probe)
            for name, h in method_handlers.items()})
