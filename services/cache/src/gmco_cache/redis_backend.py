"""Redis backends: a single node (``redis.asyncio.Redis``) and Redis Cluster
(``redis.asyncio.cluster.RedisCluster``, redis-py >= 5; never the end-of-life redis-py-cluster).

Round trips. A single node gets a batch as one MGET, or one pipeline of SETs. On the cluster the keys of a
batch are grouped by slot (one MGET per slot: keys of one user share a slot through the ``{user}`` tag),
the slot groups are grouped by the master that owns them, and each master gets one pipeline; the
pipelines run concurrently. A batch of N keys therefore costs one round trip per master touched (at most
the number of masters), whatever N is. When one master is down, the other masters' keys are still served
and the batch reports a :class:`~gmco_cache.backend.PartialFailure`.

Failover. redis-py's own retries are off (the cache's circuit breaker and per-call timeout decide what
happens on failure). After a failure the cluster backend re-reads the slot map in a background task
(``CLUSTER SLOTS``; at most one refresh at a time), outside the short per-call timeout, so that once a
replica has been promoted its slots are routed to it and hits resume.
"""

from __future__ import annotations

import asyncio
import logging
from collections import defaultdict
from collections.abc import Callable, Sequence
from types import TracebackType
from typing import Any, Self

from redis.asyncio import Redis
from redis.asyncio.cluster import ClusterNode, ClusterPipeline, RedisCluster
from redis.backoff import NoBackoff
from redis.exceptions import RedisError
from redis.retry import Retry

from gmco_cache.backend import PartialFailure

log = logging.getLogger(__name__)

# Compare-and-delete of a fill lock: only the holder's token releases it.
_UNLOCK_SCRIPT = "if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) end return 0"
# Socket limits for connects and topology reads; data calls are cut much earlier by the cache's timeout.
SOCKET_TIMEOUT_SECONDS = 1.0
STARTUP_TIMEOUT_SECONDS = 10.0
# Least time between two topology refreshes.
REFRESH_INTERVAL_SECONDS = 0.2


class _RedisCommon:
    _client: Redis | RedisCluster

    async def set_if_absent(self, key: str, value: bytes, ttl_ms: int) -> bool:
        return bool(await self._client.set(key, value, nx=True, px=ttl_ms))

    async def delete_if_equal(self, key: str, value: bytes | None) -> bool:
        if value is None:
            return bool(await self._client.delete(key))
        return bool(await self._client.eval(_UNLOCK_SCRIPT, 1, key, value))


class RedisNodeBackend(_RedisCommon):
    """One Redis node: a batch get is one MGET, a batch put one pipeline."""

    name = "redis"

    def __init__(self, client: Redis) -> None:
        self._client = client

    @classmethod
    def from_url(cls, url: str, max_connections: int, password: str | None = None) -> RedisNodeBackend:
        extra = {"password": password} if password else {}
        return cls(Redis.from_url(url, max_connections=max_connections, retry=Retry(NoBackoff(), 0), **extra,
                                  socket_timeout=SOCKET_TIMEOUT_SECONDS,
                                  socket_connect_timeout=SOCKET_TIMEOUT_SECONDS))

    async def get_many(self, keys: Sequence[str]) -> list[bytes | None]:
        return list(await self._client.mget(keys))

    async def set_many(self, items: Sequence[tuple[str, bytes, int]]) -> None:
        pipe = self._client.pipeline(transaction=False)
        for key, value, ttl_ms in items:
            pipe.set(key, value, px=ttl_ms)
        await pipe.execute()

    def failed(self) -> None:
        """The connection pool reconnects by itself."""

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self._client.aclose()


class RedisClusterBackend(_RedisCommon):
    """Redis Cluster through ``RedisCluster``: batches pipelined per slot group and per master."""

    name = "redis-cluster"

    def __init__(self, startup_nodes: Sequence[tuple[str, int]], max_connections: int,
                 password: str | None = None) -> None:
        self._client: RedisCluster = RedisCluster(
            startup_nodes=[ClusterNode(host, port) for host, port in startup_nodes], password=password,
            max_connections=max_connections, retry=Retry(NoBackoff(), 0), require_full_coverage=False,
            socket_timeout=SOCKET_TIMEOUT_SECONDS, socket_connect_timeout=SOCKET_TIMEOUT_SECONDS,
        )
        self._refresh: asyncio.Task[None] | None = None

    async def __aenter__(self) -> Self:
        try:
            await asyncio.wait_for(self._client.initialize(), STARTUP_TIMEOUT_SECONDS)
        except (RedisError, OSError, TimeoutError) as exc:
            # The service starts anyway and answers misses (bypassed) until the cluster is reachable.
            log.warning("Redis Cluster not reachable at start (%s); answering misses until it is", exc)
            self.failed()
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        if self._refresh is not None:
            self._refresh.cancel()
        await self._client.aclose()

    # -- batches -----------------------------------------------------------------------------------
    def _groups(self, keys: Sequence[str]) -> list[list[list[int]]]:
        """Key indices grouped by slot, the slot groups grouped by the master that owns the slot."""
        by_node: dict[str, dict[int, list[int]]] = defaultdict(lambda: defaultdict(list))
        nodes = self._client.nodes_manager
        for i, key in enumerate(keys):
            slot = self._client.keyslot(key)
            by_node[nodes.get_node_from_slot(slot).name][slot].append(i)
        return [list(slots.values()) for slots in by_node.values()]

    async def _pipelined(self, keys: Sequence[str], queue: Callable[[ClusterPipeline, list[int]], int],
                         ) -> tuple[list[tuple[list[int], list[Any]]], BaseException | None]:
        """Queue each slot group's commands with ``queue`` (which returns how many it queued) on its
        master's pipeline and run the pipelines concurrently. Returns (slot group, its commands' results)
        for every group served, and the first error of a master that failed (None when all answered)."""
        groups = self._groups(keys)
        pipes = []
        for slot_groups in groups:
            pipe = self._client.pipeline(transaction=False)
            pipes.append((pipe, [queue(pipe, indices) for indices in slot_groups]))
        outcomes = await asyncio.gather(*(p.execute() for p, _ in pipes), return_exceptions=True)
        served: list[tuple[list[int], list[Any]]] = []
        error: BaseException | None = None
        for slot_groups, (_, counts), outcome in zip(groups, pipes, outcomes, strict=True):
            if isinstance(outcome, BaseException):
                error = error or outcome
                continue
            start = 0
            for indices, count in zip(slot_groups, counts, strict=True):
                served.append((indices, outcome[start:start + count]))
                start += count
        if error is not None and not served:
            raise error
        return served, error

    async def get_many(self, keys: Sequence[str]) -> list[bytes | None]:
        def queue(pipe: ClusterPipeline, indices: list[int]) -> int:
            # Cluster pipelines block the mget() helper (it could span slots); these keys share one slot.
            pipe.execute_command("MGET", *(keys[i] for i in indices))
            return 1

        served, error = await self._pipelined(keys, queue)
        values: list[bytes | None] = [None] * len(keys)
        for indices, (got,) in served:
            for i, value in zip(indices, got, strict=True):
                values[i] = value
        if error is not None:
            raise PartialFailure(values, error)
        return values

    async def set_many(self, items: Sequence[tuple[str, bytes, int]]) -> None:
        def queue(pipe: ClusterPipeline, indices: list[int]) -> int:
            for i in indices:
                key, value, ttl_ms = items[i]
                pipe.set(key, value, px=ttl_ms)
            return len(indices)

        served, error = await self._pipelined([key for key, _, _ in items], queue)
        if error is not None:
            stored = [False] * len(items)
            for indices, _ in served:
                for i in indices:
                    stored[i] = True
            raise PartialFailure(stored, error)

    # -- failover ----------------------------------------------------------------------------------
    def failed(self) -> None:
        if self._refresh is None or self._refresh.done():
            self._refresh = asyncio.create_task(self._refresh_topology())

    async def _refresh_topology(self) -> None:
        try:
            await self._client.initialize()  # the full set-up when it never succeeded; a no-op otherwise
            await self._client.nodes_manager.initialize()  # re-read CLUSTER SLOTS: promoted replicas
        except (RedisError, OSError) as exc:
            log.info("Redis Cluster topology refresh failed: %s", exc)
        await asyncio.sleep(REFRESH_INTERVAL_SECONDS)
