"""Per-request values that travel through ``contextvars``: request id and deadline."""

from __future__ import annotations

import contextvars
import os
import time

request_id_var: contextvars.ContextVar[str] = contextvars.ContextVar("gmco_request_id", default="")
# Absolute deadline on the time.monotonic() clock; None = no deadline.
deadline_var: contextvars.ContextVar[float | None] = contextvars.ContextVar("gmco_deadline", default=None)

REQUEST_ID_HEADER = "x-request-id"


def new_request_id() -> str:
    """16 random hex digits (64 bits, as the first half of a uuid4's hex, at a third of its cost)."""
    return os.urandom(8).hex()


def time_remaining() -> float | None:
    """Seconds left before the current request's deadline, or None when it has none."""
    deadline = deadline_var.get()
    if deadline is None:
        return None
    return max(0.0, deadline - time.monotonic())


def call_timeout(default: float | None) -> float | None:
    """The timeout for an outgoing call: the smaller of ``default`` and what the caller has left."""
    remaining = time_remaining()
    if remaining is None:
        return default
    if default is None:
        return remaining
    return min(default, remaining)


def budget(cap: float, share: float = 0.5) -> float:
    """The timeout of a call the request can do without (cache, state, ranking): at most ``cap`` and at
    most ``share`` of what the caller has left, so that a dependency that is slow leaves the rest of the
    request time to answer, degraded, within the caller's deadline."""
    remaining = time_remaining()
    return cap if remaining is None else min(cap, share * remaining)
