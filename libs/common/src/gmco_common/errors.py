"""Domain exceptions. Domain code raises these; :mod:`gmco_common.interceptors` maps them to status codes."""

from __future__ import annotations

import grpc

# Most characters of caller input that an error message repeats, and the longest message sent back (status
# details travel in an HTTP/2 trailer, which proxies bound: an oversized one turns into UNAVAILABLE).
ECHO_CHARS = 64
MAX_MESSAGE_CHARS = 1024


def echo(value: object, limit: int = ECHO_CHARS) -> str:
    """``repr(value)`` cut to ``limit`` characters, saying how long it was: for quoting caller input."""
    text = repr(value)
    if len(text) <= limit:
        return text
    return f"{text[:limit]}... ({len(str(value))} characters)"


class GmcoError(Exception):
    """Base of all domain errors. ``str(exc)`` is safe to show to callers (and bounded in length)."""

    code: grpc.StatusCode = grpc.StatusCode.UNKNOWN

    def __init__(self, message: str) -> None:
        if len(message) > MAX_MESSAGE_CHARS:
            message = message[:MAX_MESSAGE_CHARS - 3] + "..."
        super().__init__(message)
        self.message = message


class InvalidArgument(GmcoError):
    """Bad input. The message names the field and says why."""

    code = grpc.StatusCode.INVALID_ARGUMENT

    def __init__(self, field: str, reason: str) -> None:
        super().__init__(f"{field}: {reason}")
        self.field = field
        self.reason = reason


class NotFound(GmcoError):
    code = grpc.StatusCode.NOT_FOUND


class AlreadyExists(GmcoError):
    code = grpc.StatusCode.ALREADY_EXISTS


class FailedPrecondition(GmcoError):
    """Do not retry until the state changes."""

    code = grpc.StatusCode.FAILED_PRECONDITION


class Unavailable(GmcoError):
    """A dependency is down or the service is not ready: retry with backoff."""

    code = grpc.StatusCode.UNAVAILABLE


class ResourceExhausted(GmcoError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class DeadlineExceeded(GmcoError):
    code = grpc.StatusCode.DEADLINE_EXCEEDED


class Unauthenticated(GmcoError):
    code = grpc.StatusCode.UNAUTHENTICATED


class Aborted(GmcoError):
    code = grpc.StatusCode.ABORTED


class PassedThrough(GmcoError):
    """A dependency's verdict on the caller's input, returned with its own code and message."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code


# Codes a dependency gives when the caller's request is at fault: passed through, never retried or degraded.
CALLER_CODES = frozenset({grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.FAILED_PRECONDITION,
                          grpc.StatusCode.OUT_OF_RANGE, grpc.StatusCode.NOT_FOUND})


def from_rpc_error(exc: grpc.aio.AioRpcError, dependency: str, field_prefix: str = "", hint: str = "") -> GmcoError:
    """The domain error for a failed downstream call, the one translation every caller uses.

    A verdict on the caller's input (INVALID_ARGUMENT and the other :data:`CALLER_CODES`) is passed through
    with ``field_prefix`` before its message; DEADLINE_EXCEEDED stays itself; anything else means the
    dependency failed and becomes UNAVAILABLE naming it (``hint`` says how to retry)."""
    code = exc.code()
    details = exc.details() or f"rejected by {dependency}"
    if code in CALLER_CODES:
        return PassedThrough(code, f"{field_prefix}{details}")
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return DeadlineExceeded(f"{dependency} did not answer within the deadline")
    return Unavailable(f"{dependency} answered {code.name}" + (f"; {hint}" if hint else "; retry"))


def is_dependency_failure(error: GmcoError) -> bool:
    """True when the error says a dependency failed (degrade or retry), not that the request was bad."""
    return isinstance(error, (Unavailable, DeadlineExceeded))
