"""One circuit breaker for every caller of a dependency (shard replicas in the router, Redis in the cache).

closed     calls go through; ``failures`` consecutive failures open it.
open       calls are refused for ``cooldown`` seconds.
half-open  after that, one probe goes through: success closes the breaker, failure opens it again. A
           probe that never reports back (its caller went away) is replaced after another ``cooldown``.

``available()`` only looks (replica selection asks it of every candidate); ``allow()`` also claims the
probe slot when the breaker is not closed, so exactly one caller probes.
"""

from __future__ import annotations

import enum
import time
from collections.abc import Callable


class State(enum.IntEnum):
    """The value is what breaker-state gauges show."""

    CLOSED = 0
    HALF_OPEN = 1
    OPEN = 2


class CircuitBreaker:
    def __init__(self, failures: int, cooldown: float, clock: Callable[[], float] = time.monotonic,
                 on_change: Callable[[State], None] | None = None) -> None:
        if failures < 1 or cooldown < 0:
            raise ValueError("failures must be >= 1 and cooldown >= 0")
        self._threshold = failures
        self._cooldown = cooldown
        self._clock = clock
        self._on_change = on_change
        self._failures = 0
        self._since = 0.0  # when the breaker opened, or when the current probe started
        self.state = State.CLOSED

    @property
    def is_open(self) -> bool:
        """Not closed: open, or half-open with a probe in flight."""
        return self.state is not State.CLOSED

    def _set(self, state: State) -> None:
        if state is not self.state:
            self.state = state
            if self._on_change is not None:
                self._on_change(state)

    def available(self) -> bool:
        """Whether a call may go through now; claims nothing."""
        return self.state is State.CLOSED or self._clock() - self._since >= self._cooldown

    def allow(self) -> bool:
        """``available()``, and when the breaker is not closed, claim the probe."""
        if self.state is State.CLOSED:
            return True
        if not self.available():
            return False
        self._since = self._clock()
        self._set(State.HALF_OPEN)
        return True

    def success(self) -> None:
        self._failures = 0
        self._set(State.CLOSED)

    def failure(self) -> bool:
        """Record a failure; True when this failure opened a closed breaker."""
        self._failures += 1
        if self.state is State.CLOSED and self._failures < self._threshold:
            return False
        opened = self.state is State.CLOSED
        self._since = self._clock()
        self._set(State.OPEN)
        return opened

    def abandoned(self) -> None:
        """A call ended without a verdict (cancelled): free the probe slot at once."""
        if self.state is State.HALF_OPEN:
            self._since = self._clock() - self._cooldown
            self._set(State.OPEN)
