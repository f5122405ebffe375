"""Domain exceptions. Domain code raises these; :mod:`gmco_common.interceptors` maps them to status codes."""

from __future__ import annotations

import grpc


class GmcoError(Exception):
    """Base of all domain errors. ``str(exc)`` is safe to show to callers."""

    code: grpc.StatusCode = grpc.StatusCode.UNKNOWN

    def __init__(self, message: str) -> None:
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
