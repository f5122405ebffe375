"""A circuit breaker in front of the cache backend.

closed    calls go through; ``failures`` consecutive failures open it.
open      calls are refused at once (the cache answers a bypassed miss) for ``open_seconds``.
half-open after that, one probe call goes through: success closes the breaker, failure opens it again.
          A probe that never reports back (its caller went away) is replaced after ``open_seconds``.
"""

from __future__ import annotations

import enum
import time
from collections.abc import Callable


class State(enum.IntEnum):
    """The value is what the ``gmco_cache_breaker_state`` gauge shows."""

    CLOSED = 0
    HALF_OPEN = 1
    OPEN = 2


class CircuitBreaker:
    def __init__(self, failures: int, open_seconds: float, clock: Callable[[], float] = time.monotonic,
                 on_change: Callable[[State], None] | None = None) -> None:
        self._threshold = failures
        self._open_seconds = open_seconds
        self._clock = clock
        self._on_change = on_change
        self._failures = 0
        self._since = 0.0  # when the breaker opened, or when the current probe started
        self.state = State.CLOSED

    def _set(self, state: State) -> None:
        if state is not self.state:
            self.state = state
            if self._on_change is not None:
                self._on_change(state)

    def allow(self) -> bool:
        """May a call go to the backend now? In half-open, True only for the probe."""
        if self.state is State.CLOSED:
            return True
        now = self._clock()
        if now - self._since < self._open_seconds:
            return False
        self._since = now
        self._set(State.HALF_OPEN)
        return True

    def success(self) -> None:
        self._failures = 0
        self._set(State.CLOSED)

    def failure(self) -> None:
        self._failures += 1
        if self.state is State.HALF_OPEN or self._failures >= self._threshold:
            self._since = self._clock()
            self._set(State.OPEN)
