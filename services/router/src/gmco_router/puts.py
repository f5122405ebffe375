"""The cache puts a router makes after its replies, coalesced.

A miss's list is written to the cache service after the answer has been sent (nobody waits for it). With
``window`` > 0 the first put to arrive opens a window of that many seconds; every put arriving within it
goes in the same ``PutRecommendationsBatch`` (at most ``max_batch``), so under load one cache-service call
carries several lists instead of one call each (a call costs the router about 0.3 ms of CPU whatever it
carries; docs/benchmarks.md). A batch of one is a plain ``PutRecommendations``. A cache service without the
batch method (UNIMPLEMENTED, an older version) gets one ``PutRecommendations`` per list from then on.
``window`` = 0 sends each put at once, alone.

Bounded: at most ``max_pending`` puts wait or are in flight; one more is dropped and counted. The list is
already in the router's own LRU before its put is queued, so a list reaching the cache service ``window``
later is only seen later by other routers.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import time
from collections.abc import Callable

import grpc
from gmco.cache.v1 import cache_service_pb2, cache_service_pb2_grpc
from gmco_common.context import deadline_var
from prometheus_client import Counter, Histogram

log = logging.getLogger(__name__)

CACHE_PUTS = Counter("gmco_router_cache_puts_total",
                     "Recommendation lists written to the cache service after the reply, by result "
                     "(stored, bypassed, failed, dropped: more pending puts than cache_put_max_pending).",
                     ["result"])
PUT_BATCH = Histogram("gmco_router_cache_put_batch_lists", "Lists per cache-service put call.",
                      buckets=(1, 2, 4, 8, 16, 32, 64))


class CachePuts:
    def __init__(self, stub: cache_service_pb2_grpc.CacheServiceStub, window: float, max_pending: int,
                 max_batch: int, timeout: float, observe: Callable[[float], None]) -> None:
        self._stub = stub
        self._window = window
        self._max_pending = max_pending
        self._max_batch = max_batch
        self._timeout = timeout
        self._observe = observe  # seconds per call (the cache_put stage)
        self._pending: list[cache_service_pb2.PutRecommendationsRequest] = []
        self._in_flight = 0
        self._tasks: set[asyncio.Task[None]] = set()
        self._flusher: asyncio.Task[None] | None = None
        self._batch_supported = True

    def submit(self, put: cache_service_pb2.PutRecommendationsRequest) -> None:
        """Queue one put (never raises; a put over the bound is dropped and counted)."""
        if len(self._pending) + self._in_flight >= self._max_pending:
            CACHE_PUTS.labels("dropped").inc()
            return
        if self._window <= 0:
            self._in_flight += 1  # counted now: the task may start after the next submit
            self._spawn(self._send_counted([put], counted=True))
            return
        self._pending.append(put)
        if self._flusher is None:
            self._flusher = self._spawn(self._flush_after_window())

    async def close(self) -> None:
        """Send what is queued and wait for every put (at shutdown; bounded by the calls' own timeouts)."""
        while self._tasks or self._pending:
            if self._pending and self._flusher is None:
                self._spawn(self._send_pending())
            await asyncio.gather(*list(self._tasks), return_exceptions=True)

    def _spawn(self, coro) -> asyncio.Task[None]:
        # Outside any request's context: the caller's deadline no longer bounds work done after the reply.
        ctx = contextvars.copy_context()
        ctx.run(deadline_var.set, None)
        task = asyncio.get_running_loop().create_task(coro, context=ctx)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def _flush_after_window(self) -> None:
        try:
            await asyncio.sleep(self._window)
        finally:
            self._flusher = None
        await self._send_pending()

    async def _send_pending(self) -> None:
        while self._pending:
            batch, self._pending = self._pending[:self._max_batch], self._pending[self._max_batch:]
            await self._send_counted(batch)

    async def _send_counted(self, batch: list[cache_service_pb2.PutRecommendationsRequest],
                            counted: bool = False) -> None:
        if not counted:
            self._in_flight += len(batch)
        try:
            await self._send(batch)
        finally:
            self._in_flight -= len(batch)

    async def _send(self, batch: list[cache_service_pb2.PutRecommendationsRequest]) -> None:
        if len(batch) > 1 and not self._batch_supported:
            await asyncio.gather(*(self._send([put]) for put in batch))
            return
        PUT_BATCH.observe(len(batch))
        start = time.perf_counter()
        try:
            if len(batch) == 1:
                one = await self._stub.PutRecommendations(batch[0], timeout=self._timeout)
                stored = int(one.stored)
            else:
                many = await self._stub.PutRecommendationsBatch(
                    cache_service_pb2.PutRecommendationsBatchRequest(puts=batch), timeout=self._timeout)
                stored = many.stored_count
        except grpc.aio.AioRpcError as exc:
            if len(batch) > 1 and exc.code() == grpc.StatusCode.UNIMPLEMENTED:
                log.warning("the cache service has no PutRecommendationsBatch (an older version?): one put per "
                            "list from now on")
                self._batch_supported = False
                self._pending[:0] = batch  # sent again, one by one, by the loop that sent this batch
                return
            log.warning("cache put of %d list(s) failed: %s", len(batch), exc.code().name)
            CACHE_PUTS.labels("failed").inc(len(batch))
            return
        finally:
            self._observe(time.perf_counter() - start)
        CACHE_PUTS.labels("stored").inc(stored)
        if len(batch) - stored:
            CACHE_PUTS.labels("bypassed").inc(len(batch) - stored)
