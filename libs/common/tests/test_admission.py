"""The admission limit: refuses at once beyond the limit, shrinks when latency says requests queue, grows
back when they do not, and never refuses while below the limit."""

from __future__ import annotations

import contextlib

import pytest
from gmco_common.admission import EDGE_START_HEADER, Admission, QueueDelay, edge_wait_seconds
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
    _complete(adm, fake_clock, 10, 0.010, concurrent=10)  # baseline window: 10 ms, 10 of 16 in progress
    assert adm.limit == start  # not saturated, not slow: unchanged
    _complete(adm, fake_clock, 10, 0.030, concurrent=10)  # 3x the baseline while busy: queueing
    assert adm.limit == int(start * 0.8)
    for _ in range(60):  # one round at a time, as many at once as the limit allows
        _complete(adm, fake_clock, adm.limit, 0.030, concurrent=adm.limit)
    assert adm.limit == 4


def test_slow_windows_while_far_below_the_limit_leave_it_alone(fake_clock) -> None:
    """A light load whose latency varies (a mix of slow and fast calls, a stall of the machine) is not
    queueing on this limit: the limit stays, and the next burst of weighted calls is admitted."""
    adm = Admission(max_limit=64, min_limit=4, window=10, clock=fake_clock)
    start = adm.limit
    _complete(adm, fake_clock, 10, 0.010, concurrent=2)
    for _ in range(50):
        _complete(adm, fake_clock, 10, 0.100, concurrent=2)  # 10x the baseline, never half the limit busy
    assert adm.limit == start
    with contextlib.ExitStack() as stack:
        for _ in range(5):
            stack.enter_context(adm.admit("batch", weight=3))  # 15 of 16 units: nothing refused


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
    _complete(adm, fake_clock, 5, 0.001, concurrent=5)
    for _ in range(40):  # latency 1000x while busy: the limit falls to its floor...
        _complete(adm, fake_clock, adm.limit, 1.0, concurrent=adm.limit)
    assert adm.limit == 4
    with adm.admit("m"), adm.admit("m"), adm.admit("m"), adm.admit("m"):  # ...and 4 at once still run
        pass


def test_bad_bounds_are_refused() -> None:
    with pytest.raises(ValueError):
        Admission(max_limit=2, min_limit=3)


def _arrivals(adm: Admission, clock, waits: list[float], spacing: float = 0.005) -> list[bool]:
    """One request per wait (raw seconds since the edge), ``spacing`` apart; True where it was refused."""
    refused = []
    for wait in waits:
        try:
            with adm.admit("m", waited=wait):
                refused.append(False)
        except ResourceExhausted as exc:
            assert "before this server could start it" in str(exc)
            refused.append(True)
        clock.advance(spacing)
    return refused


def test_a_standing_queue_is_cut_to_the_target_and_lets_go_once_it_drains(fake_clock) -> None:
    adm = Admission(max_limit=64, queue=QueueDelay(0.005, 0.1, clock=fake_clock), clock=fake_clock)
    assert not any(_arrivals(adm, fake_clock, [0.0005] * 20))  # the offset: the network hop, 0.5 ms
    assert not any(_arrivals(adm, fake_clock, [0.0015, 0.0105, 0.0305, 0.0205, 0.0105] * 3))  # a burst drains
    # Every wait of an interval over 5 ms: the queue stands; waits past 5 ms are refused, not shorter ones.
    assert all(_arrivals(adm, fake_clock, [0.0305, 0.0205, 0.0085] * 14)[-6:])
    assert _arrivals(adm, fake_clock, [0.0045, 0.0305]) == [False, True]
    # Once an interval's shortest wait is under the target again, waits up to the interval pass.
    _arrivals(adm, fake_clock, [0.0015] * 25)
    assert _arrivals(adm, fake_clock, [0.0505, 0.0805]) == [False, False]
    assert _arrivals(adm, fake_clock, [0.1505]) == [True]  # longer than the interval: refused in any case


def test_a_few_slow_requests_of_a_light_load_do_not_make_a_standing_queue(fake_clock) -> None:
    adm = Admission(max_limit=64, queue=QueueDelay(0.005, 0.1, min_samples=10, clock=fake_clock),
                    clock=fake_clock)
    _arrivals(adm, fake_clock, [0.0005])
    for _ in range(20):  # one request every 50 ms, every one caught by a 40 ms pause
        assert _arrivals(adm, fake_clock, [0.0405], spacing=0.05) == [False]


def test_a_constant_clock_skew_between_proxy_and_server_cancels_out(fake_clock) -> None:
    skew = 2.0  # this server's clock runs 2 s ahead of the proxy's
    adm = Admission(max_limit=64, queue=QueueDelay(0.005, 0.1, clock=fake_clock), clock=fake_clock)
    assert not any(_arrivals(adm, fake_clock, [skew + 0.0005] * 50))
    assert not any(_arrivals(adm, fake_clock, [skew + 0.003] * 50))
    assert _arrivals(adm, fake_clock, [skew + 0.0205] * 40)[-1]  # a real standing queue still shows


def test_the_edge_stamp_is_read_from_metadata_and_nonsense_ignored() -> None:
    now = 1_700_000_000.25
    assert edge_wait_seconds([("x-user-id", "u1"), (EDGE_START_HEADER, "1700000000240000")], now) == (
        pytest.approx(0.010))
    assert edge_wait_seconds([(EDGE_START_HEADER, b"1700000000250000")], now) == pytest.approx(0.0)
    for bad in ("", "12.5", "-5", "9" * 21, "abc", "1", "1700000011000000"):  # ... 1 us after 1970, 10.75 s ahead
        assert edge_wait_seconds([(EDGE_START_HEADER, bad)], now) is None
    assert edge_wait_seconds([("x-user-id", "u1")], now) is None
    assert edge_wait_seconds(None, now) is None


def test_bad_queue_bounds_are_refused() -> None:
    with pytest.raises(ValueError):
        QueueDelay(0.2, 0.1)
