"""The admission limit: refuses at once beyond the limit, shrinks when latency says requests queue, grows
back when they do not, and never refuses while below the limit."""

from __future__ import annotations

import contextlib

import pytest
from gmco_common.admission import Admission
from gmco_common.errors import ResourceExhausted


def _complete(adm: Admission, clock, n: int, seconds: float, concurrent: int = 1) -> None:
    """``n`` requests, ``concurrent`` at a time, each taking ``seconds``."""
    for _ in range(0, n, concurrent):
        with contextlib.ExitStack() as stack:
            for _ in range(concurrent):
                stack.enter_context(adm.admit("m"))
            clock.advance(seconds)


def test_refuses_beyond_the_limit_and_admits_again_when_one_finishes(fake_clock) -> None:
    adm = Admission(max_limit=2, min_limit=1, clock=fake_clock)
    assert adm.limit == 2
    with (adm.admit("m"), adm.admit("m"),
          pytest.raises(ResourceExhausted, match=r"overloaded: 2 requests in progress \(limit 2\)"),
          adm.admit("m")):
        pass
    with adm.admit("m"):
        assert adm.in_flight == 1
    assert adm.in_flight == 0


def test_a_request_heavier_than_the_limit_runs_alone(fake_clock) -> None:
    adm = Admission(max_limit=4, min_limit=1, clock=fake_clock)
    with adm.admit("batch", weight=10), pytest.raises(ResourceExhausted), adm.admit("m"):
        pass


def test_latency_above_the_baseline_shrinks_the_limit_down_to_its_floor(fake_clock) -> None:
    adm = Admission(max_limit=64, min_limit=4, window=10, clock=fake_clock)
    start = adm.limit
    _complete(adm, fake_clock, 10, 0.010)  # baseline window: 10 ms
    assert adm.limit == start  # not saturated, not slow: unchanged
    _complete(adm, fake_clock, 10, 0.030)  # 3x the baseline: queueing
    assert adm.limit == int(start * 0.8)
    _complete(adm, fake_clock, 200, 0.030)
    assert adm.limit == 4


def test_a_saturated_limit_grows_while_latency_stays_at_the_baseline(fake_clock) -> None:
    adm = Admission(max_limit=20, min_limit=2, window=8, clock=fake_clock)
    assert adm.limit == 8
    _complete(adm, fake_clock, 8, 0.010, concurrent=8)  # every request found the limit full
    assert adm.limit == 9
    for _ in range(30):
        _complete(adm, fake_clock, adm.limit, 0.010, concurrent=adm.limit)
    assert adm.limit == 20  # never past the ceiling


def test_slow_requests_below_the_limit_are_never_refused(fake_clock) -> None:
    adm = Admission(max_limit=16, min_limit=4, window=5, clock=fake_clock)
    _complete(adm, fake_clock, 5, 0.001)
    _complete(adm, fake_clock, 100, 1.0)  # latency 1000x: the limit falls to its floor...
    assert adm.limit == 4
    with adm.admit("m"), adm.admit("m"), adm.admit("m"), adm.admit("m"):  # ...and 4 at once still run
        pass


def test_bad_bounds_are_refused() -> None:
    with pytest.raises(ValueError):
        Admission(max_limit=2, min_limit=3)
