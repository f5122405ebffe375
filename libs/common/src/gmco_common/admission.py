"""An admission limit on concurrent work, whose ceiling follows latency.

A service past its capacity that queues every request makes every caller wait: latency grows with
the queue until deadlines expire, and the work done for expired requests is wasted. :class:`Admission`
instead refuses a request at once (RESOURCE_EXHAUSTED, which callers retry with backoff and Envoy does
not retry) when ``limit`` requests are already in progress, so the accepted ones keep their unloaded
latency.

The limit adapts (additive increase, multiplicative decrease, as TCP Vegas-style limiters do): every
``window`` completed requests the window's median latency is compared with a *baseline*, the lowest
window median of the last ``baseline_windows`` windows. A median above ``tolerance`` x baseline means
requests are queueing: the limit drops to ``decrease`` of itself (never below ``min_limit``). Otherwise,
when the limit was reached during the window, it grows by one (never above ``max_limit``). A window in
which the requests in progress never reached half the limit changes nothing: its latency says nothing
about this limit (the service was not busy with admitted work; a mix of slower requests, a stall of
the machine), and lowering the limit then would only refuse the next burst. (Without this rule the
limit drifted to its floor under a light mixed load and ``make soak`` saw RecommendBatch calls shed at
30 req/s.) While fewer than ``limit`` requests are in progress nothing is refused, whatever the
latency. The limit starts at 4 x ``min_limit``: a baseline learnt under a load that was already too
high would hide it.
"""

from __future__ import annotations

import contextlib
import statistics
import time
from collections import deque
from collections.abc import Callable, Iterator

from prometheus_client import Counter, Gauge

from gmco_common.errors import ResourceExhausted

SHED = Counter("gmco_admission_shed_total", "Requests refused by the admission limit (RESOURCE_EXHAUSTED).",
               ["method"])
IN_FLIGHT = Gauge("gmco_admission_in_flight_requests", "Requests admitted and not yet answered.")
LIMIT = Gauge("gmco_admission_limit_requests", "The admission limit now (requests in progress at once).")


class Admission:
    def __init__(self, max_limit: int, min_limit: int = 4, *, window: int = 50, tolerance: float = 1.5,
                 decrease: float = 0.8, baseline_windows: int = 100,
                 clock: Callable[[], float] = time.perf_counter) -> None:
        if not 1 <= min_limit <= max_limit:
            raise ValueError("need 1 <= min_limit <= max_limit")
        self.max_limit, self.min_limit = max_limit, min_limit
        # Start low and grow: a baseline learnt while already overloaded would hide the overload.
        self.limit = min(max_limit, 4 * min_limit)
        self.in_flight = 0
        self._window, self._tolerance, self._decrease = window, tolerance, decrease
        self._clock = clock
        self._samples: list[float] = []
        self._medians: deque[float] = deque(maxlen=baseline_windows)
        self._saturated = False
        self._peak = 0  # most units in progress at once during the current window
        LIMIT.set(self.limit)

    @contextlib.contextmanager
    def admit(self, method: str, weight: int = 1) -> Iterator[None]:
        """Hold ``weight`` units of the limit for the body; RESOURCE_EXHAUSTED when they are not free.
        A request heavier than the whole limit is let in alone (when nothing else is in progress)."""
        if self.in_flight + weight > self.limit and self.in_flight > 0:
            self._saturated = True
            SHED.labels(method).inc()
            raise ResourceExhausted(
                f"overloaded: {self.in_flight} requests in progress (limit {self.limit}); retry with backoff")
        self.in_flight += weight
        self._peak = max(self._peak, self.in_flight)
        IN_FLIGHT.inc(weight)
        if self.in_flight >= self.limit:
            self._saturated = True
        start = self._clock()
        try:
            yield
        finally:
            self.in_flight -= weight
            IN_FLIGHT.dec(weight)
            self._observe(self._clock() - start)

    def _observe(self, seconds: float) -> None:
        self._samples.append(seconds)
        if len(self._samples) < self._window:
            return
        median = statistics.median(self._samples)
        self._samples.clear()
        self._medians.append(median)
        baseline = min(self._medians)
        if 2 * self._peak < self.limit:
            pass  # never half busy: this window's latency is not about the limit
        elif median > self._tolerance * baseline:
            self.limit = max(self.min_limit, int(self.limit * self._decrease))
        elif self._saturated:
            self.limit = min(self.max_limit, self.limit + 1)
        self._saturated = False
        self._peak = self.in_flight
        LIMIT.set(self.limit)
