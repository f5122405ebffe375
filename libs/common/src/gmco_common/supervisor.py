"""One supervisor for a service's background work.

- **Periodic jobs** (``every``): snapshots, metric refreshes, reloads. A failure is logged with its
  traceback, counted in ``gmco_background_failures_total{job}``, and the job runs again at its next
  period: one bad run never ends the schedule.
- **Must-run tasks** (``keep_running``): the catalogue-log tailer. While one is down the service reports
  NOT_SERVING (its health condition of the same name is false); it is restarted with exponential
  backoff, and each restart is counted in ``gmco_background_restarts_total{job}``.
- **One-off tasks** (``spawn``): a compaction. The exception of one that fails is logged and counted,
  never left on a task nobody awaits.

The supervisor is an async context manager on the service's exit stack: leaving it cancels every task and
awaits it, so nothing runs on after the clients it uses are closed.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Coroutine
from types import TracebackType
from typing import Any, Protocol, Self

from prometheus_client import Counter, Gauge

log = logging.getLogger(__name__)

FAILURES = Counter("gmco_background_failures_total",
                   "Background job runs that raised (the job goes on at its next period, or restarts).", ["job"])
RESTARTS = Counter("gmco_background_restarts_total", "Restarts of must-run background tasks after they died.",
                   ["job"])
UP = Gauge("gmco_background_task_up", "1 while a must-run background task is running, 0 while it is down.",
           ["job"])


class HealthSink(Protocol):
    async def set_condition(self, name: str, ok: bool) -> None: ...


class Supervisor:
    def __init__(self, health: HealthSink | None = None, max_backoff: float = 30.0) -> None:
        self._health = health
        self._max_backoff = max_backoff
        self._tasks: set[asyncio.Task[Any]] = set()
        self._closed = False

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.close()

    async def close(self) -> None:
        self._closed = True
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def _start(self, name: str, coro: Coroutine[Any, Any, Any]) -> asyncio.Task[Any]:
        if self._closed:
            coro.close()
            raise RuntimeError(f"supervisor is closed; cannot start {name}")
        task = asyncio.create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    @staticmethod
    def _failed(name: str, what: str) -> None:
        FAILURES.labels(name).inc()
        log.exception("background job %s failed%s", name, what)

    # -- periodic jobs ---------------------------------------------------------------------------------
    def every(self, name: str, seconds: float, job: Callable[[], Awaitable[Any]],
              first_delay: float | None = None) -> asyncio.Task[Any]:
        """Run ``job`` every ``seconds`` (first after ``first_delay``, default one period)."""
        if seconds <= 0:
            raise ValueError(f"{name}: period must be > 0 seconds")

        async def loop() -> None:
            await asyncio.sleep(seconds if first_delay is None else first_delay)
            while True:
                try:
                    await job()
                except asyncio.CancelledError:
                    raise
                except Exception:  # noqa: BLE001 - logged and counted; the schedule goes on
                    self._failed(name, f"; next run in {seconds:g}s")
                await asyncio.sleep(seconds)

        return self._start(name, loop())

    # -- must-run tasks --------------------------------------------------------------------------------
    def keep_running(self, name: str, run: Callable[[], Awaitable[Any]], backoff: float = 0.2) -> asyncio.Task[Any]:
        """Run ``run()`` for the life of the service; NOT_SERVING while it is down, restarted with backoff."""

        async def loop() -> None:
            delay = backoff
            while True:
                UP.labels(name).set(1)
                await self._set_health(name, True)
                try:
                    await run()
                    raise RuntimeError(f"{name} returned; a must-run task never should")
                except asyncio.CancelledError:
                    raise
                except Exception:  # noqa: BLE001 - logged, counted, restarted
                    self._failed(name, f"; NOT_SERVING until it is restarted in {delay:.1f}s")
                UP.labels(name).set(0)
                await self._set_health(name, False)
                await asyncio.sleep(delay)
                RESTARTS.labels(name).inc()
                delay = min(delay * 2, self._max_backoff)

        return self._start(name, loop())

    async def _set_health(self, name: str, ok: bool) -> None:
        if self._health is not None:
            await self._health.set_condition(name, ok)

    # -- one-off tasks ---------------------------------------------------------------------------------
    def spawn(self, name: str, work: Awaitable[Any]) -> asyncio.Task[Any]:
        """Run ``work`` once in the background; a failure is logged and counted, and re-raised to awaiters."""

        async def wrapped() -> Any:
            try:
                return await work
            except asyncio.CancelledError:
                raise
            except Exception:
                self._failed(name, "")
                raise

        task = self._start(name, wrapped())
        task.add_done_callback(lambda t: t.cancelled() or t.exception())  # retrieved: no "never awaited" noise
        return task
