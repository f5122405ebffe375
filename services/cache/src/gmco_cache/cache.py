"""The cache: batched gets and puts over a backend, behind a circuit breaker and a short per-call timeout,
with fill locks against stampedes.

A backend that fails, is slow or is circuit-open never fails a caller: a get answers "miss" with
``bypassed`` set, a put answers "not stored" with ``bypassed`` set. The per-call timeout is the smaller
of ``op_timeout`` and what the caller's deadline leaves; running out of the caller's deadline is not
counted against the backend.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections import Counter as Tally
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import TypeVar

from gmco_common.breaker import CircuitBreaker, State
from gmco_common.context import call_timeout, time_remaining

from gmco_cache.backend import Backend, PartialFailure
from gmco_cache.config import Settings
from gmco_cache.keys import Key, Keyspace
from gmco_cache.metrics import BACKEND_FAILURES, BACKEND_SECONDS, BREAKER_STATE, FILL_LOCKS, REQUESTS

log = logging.getLogger(__name__)
T = TypeVar("T")


class Bypass(Exception):
    """The backend was skipped or failed; the answer is a miss."""


@dataclass(frozen=True)
class Policy:
    ttl_seconds: dict[Keyspace, int]
    op_timeout: float
    lock_ttl_ms: int
    lock_wait: float
    lock_poll: float

    @classmethod
    def from_settings(cls, s: Settings) -> Policy:
        return cls(
            ttl_seconds={Keyspace.RECOMMENDATIONS: s.rec_ttl_seconds, Keyspace.USER_VECTOR: s.user_vector_ttl_seconds,
                         Keyspace.MEDIA_VECTOR: s.media_vector_ttl_seconds},
            op_timeout=s.op_timeout_seconds, lock_ttl_ms=s.lock_ttl_ms, lock_wait=s.lock_wait_seconds,
            lock_poll=s.lock_poll_seconds,
        )


@dataclass(frozen=True)
class Lookup:
    values: list[bytes | None]
    bypassed: bool


@dataclass(frozen=True)
class Stored:
    count: int
    bypassed: bool


@dataclass(frozen=True)
class RecLookup:
    value: bytes | None
    bypassed: bool
    lock_token: str = ""


def breaker_for(settings: Settings) -> CircuitBreaker:
    def changed(state: State) -> None:
        BREAKER_STATE.set(state.value)
        log.log(logging.WARNING if state is State.OPEN else logging.INFO, "cache circuit breaker is now %s",
                state.name.lower())

    BREAKER_STATE.set(State.CLOSED.value)
    return CircuitBreaker(settings.breaker_failures, settings.breaker_open_seconds, on_change=changed)


class Cache:
    def __init__(self, backend: Backend, policy: Policy, breaker: CircuitBreaker) -> None:
        self._backend = backend
        self._policy = policy
        self._breaker = breaker

    async def _call(self, op: str, fn: Callable[[], Awaitable[T]]) -> T:
        """Run one backend call through the breaker and the timeout; Bypass when it cannot be used."""
        if not self._breaker.allow():
            BACKEND_FAILURES.labels(op, "open").inc()
            raise Bypass
        limit = call_timeout(self._policy.op_timeout)
        start = time.perf_counter()
        reason = ""
        try:
            async with asyncio.timeout(limit):
                return await fn()
        except PartialFailure:
            reason = "partial"
            raise
        except TimeoutError:
            # Out of the caller's deadline rather than the backend's time: not the backend's fault.
            reason = "timeout" if limit is not None and limit >= self._policy.op_timeout else "deadline"
            raise Bypass from None
        except Exception as exc:
            reason = "error"
            log.debug("cache backend %s failed: %r", op, exc)
            raise Bypass from exc
        finally:
            BACKEND_SECONDS.labels(self._backend.name, op).observe(time.perf_counter() - start)
            if reason:
                BACKEND_FAILURES.labels(op, reason).inc()
                if reason != "deadline":
                    self._breaker.failure()
                    self._backend.failed()
            else:
                self._breaker.success()

    # -- batched gets and puts ---------------------------------------------------------------------
    async def get(self, keys: Sequence[Key]) -> Lookup:
        redis_keys = [k.redis_key for k in keys]
        try:
            values = await self._call("get", lambda: self._backend.get_many(redis_keys))
            bypassed = False
        except PartialFailure as exc:
            values, bypassed = exc.values, True
        except Bypass:
            values, bypassed = [None] * len(keys), True
        tally = Tally((k.keyspace, "hit" if v is not None else "bypass" if bypassed else "miss")
                      for k, v in zip(keys, values, strict=True))
        for (keyspace, result), n in tally.items():
            REQUESTS.labels(keyspace.value, "get", result).inc(n)
        return Lookup(values, bypassed)

    async def put(self, entries: Sequence[tuple[Key, bytes]], ttl_seconds: int = 0) -> Stored:
        """Store entries with ``ttl_seconds`` (0: each keyspace's default).

        A fill lock is left to expire rather than deleted here: a caller that missed just before this put
        would otherwise find no lock, take it and recompute a value that is already there."""
        ttl = self._policy.ttl_seconds
        items = [(k.redis_key, v, 1000 * (ttl_seconds or ttl[k.keyspace])) for k, v in entries]
        try:
            await self._call("put", lambda: self._backend.set_many(items))
            stored = [True] * len(entries)
        except PartialFailure as exc:
            stored = exc.values
        except Bypass:
            stored = [False] * len(entries)
        tally = Tally((k.keyspace, "stored" if ok else "bypass") for (k, _), ok in zip(entries, stored, strict=True))
        for (keyspace, result), n in tally.items():
            REQUESTS.labels(keyspace.value, "put", result).inc(n)
        return Stored(sum(stored), not all(stored))

    # -- recommendations with fill locks -----------------------------------------------------------
    async def get_recommendations(self, key: Key, lock_on_miss: bool) -> RecLookup:
        lookup = await self.get([key])
        value = lookup.values[0]
        if value is not None or lookup.bypassed or not lock_on_miss:
            return RecLookup(value, lookup.bypassed)
        return await self._wait_or_lock(key)

    async def _wait_or_lock(self, key: Key) -> RecLookup:
        """Take the fill lock, or wait (polling value and lock) for its holder's put, up to ``lock_wait``
        and the caller's deadline. The lock expires by itself after ``lock_ttl_ms``."""
        policy = self._policy
        token = secrets.token_hex(8)
        remaining = time_remaining()
        wait = policy.lock_wait if remaining is None else min(policy.lock_wait, remaining)
        deadline = time.monotonic() + wait
        held_by_other = False
        try:
            while True:
                if not held_by_other and await self._call(
                        "lock", lambda: self._backend.set_if_absent(key.lock_key, token.encode(), policy.lock_ttl_ms)):
                    FILL_LOCKS.labels("acquired").inc()
                    return RecLookup(None, False, token)
                if time.monotonic() + policy.lock_poll > deadline:
                    FILL_LOCKS.labels("busy").inc()
                    return RecLookup(None, False)
                await asyncio.sleep(policy.lock_poll)
                value, holder = await self._call("get", lambda: self._backend.get_many([key.redis_key, key.lock_key]))
                if value is not None:
                    FILL_LOCKS.labels("filled").inc()
                    return RecLookup(value, False)
                held_by_other = holder is not None
        except (Bypass, PartialFailure):
            FILL_LOCKS.labels("bypass").inc()
            return RecLookup(None, True)

    async def release_lock(self, key: Key, token: str) -> bool:
        """Drop the fill lock of ``key``: only when it holds ``token``, unless ``token`` is empty."""
        try:
            return await self._call("unlock", lambda: self._backend.delete_if_equal(
                key.lock_key, token.encode() if token else None))
        except (Bypass, PartialFailure):
            return False
