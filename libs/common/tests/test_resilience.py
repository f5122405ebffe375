"""The shared resilience pieces: the circuit breaker, the TTL LRU, the downstream-error translation."""

from __future__ import annotations

import grpc
import pytest
from gmco_common.breaker import CircuitBreaker, State
from gmco_common.errors import (
    DeadlineExceeded,
    InvalidArgument,
    PassedThrough,
    Unavailable,
    echo,
    from_rpc_error,
    is_dependency_failure,
)
from gmco_common.lru import TtlLru


def test_breaker_opens_probes_and_closes(fake_clock) -> None:
    b = CircuitBreaker(failures=3, cooldown=2.0, clock=fake_clock)
    assert not b.failure() and not b.failure() and b.available()
    assert b.failure() and b.is_open and not b.available()
    fake_clock.now += 2.0
    assert b.available()
    b.allow()  # the probe
    assert not b.available()  # only one probe at a time
    b.failure()
    assert b.is_open and not b.available()
    fake_clock.now += 2.0
    b.allow()
    b.success()
    assert not b.is_open and b.available()


def test_success_resets_consecutive_failures() -> None:
    b = CircuitBreaker(failures=2, cooldown=1.0)
    b.failure()
    b.success()
    b.failure()
    assert not b.is_open


def test_breaker_transitions_and_probe_replacement(fake_clock) -> None:
    changes: list[State] = []
    breaker = CircuitBreaker(3, 1.0, fake_clock, changes.append)
    for _ in range(2):
        breaker.failure()
    breaker.success()  # success resets the count
    for _ in range(2):
        breaker.failure()
    assert breaker.allow() and breaker.state is State.CLOSED
    breaker.failure()
    assert breaker.state is State.OPEN and not breaker.allow()
    fake_clock.now += 1.0
    assert breaker.allow() and breaker.state is State.HALF_OPEN  # the probe
    assert not breaker.allow()  # only one probe
    breaker.failure()
    assert breaker.state is State.OPEN and not breaker.allow()
    fake_clock.now += 1.0
    assert breaker.allow()
    fake_clock.now += 1.0
    assert breaker.allow()  # a probe that never reported back is replaced
    breaker.success()
    assert breaker.state is State.CLOSED and breaker.allow()
    assert changes == [State.OPEN, State.HALF_OPEN, State.OPEN, State.HALF_OPEN, State.CLOSED]


def test_ttl_lru(fake_clock) -> None:
    lru: TtlLru[str, int] = TtlLru(2, ttl=5.0, clock=fake_clock)
    lru.put("a", 1)
    lru.put("b", 2)
    assert lru.get("a") == 1
    lru.put("c", 3)  # evicts b, the least recently used
    assert lru.get("b") is None and len(lru) == 2
    fake_clock.now += 6
    assert lru.get("a") is None and lru.get_stale("a") == 1


def _rpc_error(code: grpc.StatusCode, details: str) -> grpc.aio.AioRpcError:
    return grpc.aio.AioRpcError(code, grpc.aio.Metadata(), grpc.aio.Metadata(), details=details)


@pytest.mark.parametrize(("code", "kind", "failure"), [
    (grpc.StatusCode.INVALID_ARGUMENT, PassedThrough, False),
    (grpc.StatusCode.FAILED_PRECONDITION, PassedThrough, False),
    (grpc.StatusCode.UNAVAILABLE, Unavailable, True),
    (grpc.StatusCode.INTERNAL, Unavailable, True),
    (grpc.StatusCode.RESOURCE_EXHAUSTED, Unavailable, True),
    (grpc.StatusCode.DEADLINE_EXCEEDED, DeadlineExceeded, True),
])
def test_downstream_codes_translate_once(code, kind, failure) -> None:
    error = from_rpc_error(_rpc_error(code, "region: unknown"), "ontology", "requests[2]: ", hint="retry later")
    assert isinstance(error, kind) and is_dependency_failure(error) is failure
    if kind is PassedThrough:
        assert error.code == code and error.message == "requests[2]: region: unknown"
    elif kind is Unavailable:
        assert error.message == f"ontology answered {code.name}; retry later"


def test_echoed_input_and_messages_are_bounded() -> None:
    huge = "u" * 100_000
    assert len(echo(huge)) < 100 and "100000 characters" in echo(huge)
    assert len(InvalidArgument("user_id", huge).message) <= 1024
