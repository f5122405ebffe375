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

The limit counts requests whose handler has started; it cannot see the ones still waiting for the
server's event loop. Under overload that queue is where the time goes: in the chaos suite at 3x
capacity, routers behind Envoy's circuit breaker (32 requests per router) spent about 25 ms in their
handlers while their callers saw 240 ms, the rest waiting in front of the handler. :class:`QueueDelay`
sheds from that queue. Envoy stamps each request with the time it received it (``EDGE_START_HEADER``);
a handler's wait is the time since then, less the smallest such wait of the last minute (the network
hop, and any skew between the proxy's clock and this one). Like CoDel, it tells a queue that drains
from a standing one by the *smallest* wait of each ``interval``: when even that exceeded ``target``
(over at least ``min_samples`` requests), requests that waited longer than ``target`` are refused for
the next interval; otherwise only ones that waited longer than ``interval``. A burst, or a pause of the
process, that some requests wait out is let through; a queue that never empties is cut to ``target``.

The router's defaults (20 ms, 500 ms) are far from CoDel's own 5 ms and 100 ms, by measurement on the
2-core machine: with 5 ms / 100 ms the bench stack's hit path refused 19 calls at 750 a second and 26
to 238 at 1,000 (pauses of the machine make every wait of 100 ms exceed 5 ms), where 20 ms / 500 ms
refused none; at 3x overload in the chaos suite 5 ms / 100 ms halved the accepted latency in one
series of runs and 20 ms / 500 ms did not change it measurably (docs/reliability.md).
"""

from __future__ import annotations

import contextlib
import math
import statistics
import time
from collections import deque
from collections.abc import Callable, Iterator

from prometheus_client import Counter, Gauge, Histogram

from gmco_common.errors import ResourceExhausted

EDGE_START_HEADER = "x-gmco-edge-start-us"  # set by Envoy: when it received the request, unix microseconds
_MAX_STAMP_CHARS = 20
_MAX_PLAUSIBLE_WAIT_S = 10.0

SHED = Counter("gmco_admission_shed_total",
               "Requests refused (RESOURCE_EXHAUSTED), by method and reason: limit (too many in progress) or "
               "queue (waited too long before its handler started).", ["method", "reason"])
QUEUE_WAIT = Histogram("gmco_admission_queue_wait_seconds",
                       "Time from the edge proxy receiving a request to its handler starting, less the "
                       "smallest such time of the last minute.",
                       buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 1.0))
IN_FLIGHT = Gauge("gmco_admission_in_flight_requests", "Requests admitted and not yet answered.")
LIMIT = Gauge("gmco_admission_limit_requests", "The admission limit now (requests in progress at once).")


def edge_wait_seconds(metadata: object, now: float | None = None) -> float | None:
    """Seconds since the edge proxy received the request, from its ``EDGE_START_HEADER`` in ``metadata``
    (gRPC invocation metadata); None when the header is absent or is not a timestamp."""
    for key, value in metadata or ():
        if key == EDGE_START_HEADER:
            text = value if isinstance(value, str) else value.decode(errors="replace")
            if not (0 < len(text) <= _MAX_STAMP_CHARS and text.isdigit()):
                return None
            wait = (time.time() if now is None else now) - int(text) / 1e6
            # Beyond this the stamp is not a wait nor a clock skew of a working deployment (NTP keeps
            # clocks within milliseconds); taking it would shift every other request's wait for a minute.
            return wait if abs(wait) <= _MAX_PLAUSIBLE_WAIT_S else None
    return None


class QueueDelay:
    """Refuses requests that waited too long in front of their handler (see the module's docstring)."""

    def __init__(self, target: float, interval: float, *, min_samples: int = 10, offset_horizon: float = 60.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if not 0 < target <= interval:
            raise ValueError("need 0 < target <= interval")
        self.target, self.interval, self._min_samples = target, interval, min_samples
        self._clock = clock
        self.overloaded = False
        self._interval_end = clock() + interval
        self._interval_min, self._interval_count = math.inf, 0
        # The offset: the smallest raw wait of this half of the horizon and of the one before.
        self._half = offset_horizon / 2
        self._half_end = clock() + self._half
        self._offset_now, self._offset_before = math.inf, math.inf

    def excess(self, raw_wait: float) -> tuple[float, float] | None:
        """Record one request's raw wait; (its wait, the wait allowed) when it must be refused, else None."""
        now = self._clock()
        if now >= self._half_end:
            self._offset_before, self._offset_now = self._offset_now, math.inf
            self._half_end = now + self._half
        self._offset_now = min(self._offset_now, raw_wait)
        wait = raw_wait - min(self._offset_now, self._offset_before)
        QUEUE_WAIT.observe(wait)
        if now >= self._interval_end:
            self.overloaded = self._interval_count >= self._min_samples and self._interval_min > self.target
            self._interval_min, self._interval_count = math.inf, 0
            self._interval_end = now + self.interval
        self._interval_min = min(self._interval_min, wait)
        self._interval_count += 1
        allowed = self.target if self.overloaded else self.interval
        return (wait, allowed) if wait > allowed else None


class Admission:
    def __init__(self, max_limit: int, min_limit: int = 4, *, window: int = 50, tolerance: float = 1.5,
                 decrease: float = 0.8, baseline_windows: int = 100, queue: QueueDelay | None = None,
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
        self.queue = queue
        LIMIT.set(self.limit)

    @contextlib.contextmanager
    def admit(self, method: str, weight: int = 1, waited: float | None = None) -> Iterator[None]:
        """Hold ``weight`` units of the limit for the body; RESOURCE_EXHAUSTED when they are not free, or
        when the request ``waited`` (raw seconds since the edge received it, :func:`edge_wait_seconds`)
        longer than the queue allows. A request heavier than the whole limit is let in alone (when
        nothing else is in progress)."""
        if waited is not None and self.queue is not None:
            refused = self.queue.excess(waited)
            if refused is not None:
                SHED.labels(method, "queue").inc()
                raise ResourceExhausted(
                    f"overloaded: waited {refused[0] * 1000:.0f} ms before this server could start it "
                    f"(allowed {refused[1] * 1000:.0f} ms); retry with backoff")
        if self.in_flight + weight > self.limit and self.in_flight > 0:
            self._saturated = True
            SHED.labels(method, "limit").inc()
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
