"""Shard replicas: where they are, whether they are healthy, and which one gets the next call.

Each shard has a :class:`ReplicaSet`. A call goes to a healthy replica whose circuit is closed, the one
expected to answer first ((calls in flight + 1) x median latency, one call in twenty to each in turn). A call
slower than the fastest replica's recent p95 is hedged to a second replica and the first answer wins; a
call that fails is retried once on another replica. A replica's circuit opens after ``breaker_failures`` consecutive failures and lets one probe
through after ``breaker_cooldown``. Health comes from the standard gRPC health service, polled in the
background by :class:`ShardPool`, which also re-resolves DNS when replicas come from DNS.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import random
import socket
import time
from collections import deque
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Self, TypeVar

import grpc
from gmco.shard.v1 import shard_service_pb2, shard_service_pb2_grpc
from gmco_common.breaker import CircuitBreaker
from gmco_common.channels import ChannelOptions, make_channel
from gmco_common.config import ConfigError
from gmco_common.supervisor import Supervisor
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client import Counter, Gauge

log = logging.getLogger(__name__)

T = TypeVar("T")
ShardCall = Callable[[shard_service_pb2_grpc.ShardServiceStub], Awaitable[T]]

SHARD_SERVICE = "gmco.shard.v1.ShardService"
EXPLORE_EVERY = 20  # one shard call in this many goes to the replicas in turn, so every latency stays known
SEARCH_METHOD = f"/{SHARD_SERVICE}/Search"

HEDGED = Counter("gmco_router_hedged_calls_total", "Shard calls hedged to a second replica.", ["shard"])
FAILOVERS = Counter("gmco_router_failover_calls_total", "Shard calls retried on another replica.", ["shard"])
BREAKER_OPENED = Counter("gmco_router_breaker_opened_total", "Replica circuits opened.", ["shard"])
REPLICA_HEALTHY = Gauge("gmco_router_replica_healthy", "1 when the replica's health check passes.",
                        ["shard", "replica"])

# Codes that say something about the replica (as opposed to the request or the caller).
_REPLICA_FAULTS = frozenset({
    grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.INTERNAL,
    grpc.StatusCode.UNKNOWN, grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.DATA_LOSS,
})


def search_channel(target: str, opts: ChannelOptions) -> grpc.aio.Channel:
    """A channel for the fan-out's Search calls: ``make_channel``'s options without its per-call
    interceptors (the fan-out computes deadline, ids and trace context once for all shards). Its arguments
    equal those of the replica's other channel, so gRPC shares one subchannel (one TCP connection)."""
    return make_channel(target, opts, interceptors=False)


class NoReplicaAvailable(Exception):
    """Every replica of a shard is unhealthy or has an open circuit."""


@dataclass(frozen=True)
class ReplicaPolicy:
    breaker_failures: int = 5
    breaker_cooldown: float = 2.0
    hedge: bool = True
    hedge_min_delay: float = 0.002
    hedge_min_samples: int = 20
    health_interval: float = 1.0
    latency_window: int = 200


class LatencyWindow:
    """The last ``size`` latencies of successful calls and their p95.

    The p95 is re-sorted once a sixteenth of the window is new, not after every sample: every shard call
    asks for it (its hedge delay), and a full sort per call was a visible part of the fan-out's cost."""

    def __init__(self, size: int) -> None:
        self._samples: deque[float] = deque(maxlen=size)
        self._sorted: list[float] | None = None
        self._new = 0

    def __len__(self) -> int:
        return len(self._samples)

    def add(self, seconds: float) -> None:
        self._samples.append(seconds)
        self._new += 1

    def p50(self) -> float:
        self.p95()  # re-sorts when due
        return self._sorted[len(self._sorted) // 2] if self._sorted else 0.0

    def p95(self) -> float:
        if not self._samples:
            return 0.0
        if self._sorted is None or self._new * 16 >= len(self._samples):
            self._sorted = sorted(self._samples)
            self._new = 0
        return self._sorted[min(len(self._sorted) - 1, int(0.95 * len(self._sorted)))]


@dataclass(eq=False)
class Replica:
    shard_id: int
    target: str
    channel: grpc.aio.Channel
    policy: ReplicaPolicy
    healthy: bool = True
    in_flight: int = 0
    # The fan-out's channel for Search (no per-call interceptor; gmco_router.fanout); None: ``channel``.
    search_channel: grpc.aio.Channel | None = None
    breaker: CircuitBreaker = field(init=False)
    latencies: LatencyWindow = field(init=False)

    def __post_init__(self) -> None:
        self.stub = shard_service_pb2_grpc.ShardServiceStub(self.channel)
        # Search with a request already serialised (the same bytes go to every shard).
        self._search = (self.search_channel or self.channel).unary_unary(
            SEARCH_METHOD, request_serializer=None, response_deserializer=shard_service_pb2.SearchResponse.FromString)
        self.breaker = CircuitBreaker(self.policy.breaker_failures, self.policy.breaker_cooldown)
        self.latencies = LatencyWindow(self.policy.latency_window)

    def search(self, payload: bytes, timeout: float | None, metadata: tuple[tuple[str, str], ...]
               ) -> Awaitable[shard_service_pb2.SearchResponse]:
        """One Search of serialised ``payload``. ``metadata`` and ``timeout`` are the caller's to propagate
        (on ``channel``, which propagates them itself, the metadata is left to its interceptor)."""
        return self._search(payload, timeout=timeout,
                            metadata=metadata if self.search_channel is not None else None)

    def selectable(self) -> bool:
        return self.healthy and self.breaker.available()

    def hedge_delay(self) -> float | None:
        """Seconds after which a call to this replica is hedged by its own p95; None when there is no basis
        yet. :meth:`ReplicaSet.hedge_delay` (the set's fastest p95) is what the router uses."""
        if not self.policy.hedge or len(self.latencies) < self.policy.hedge_min_samples:
            return None
        return max(self.latencies.p95(), self.policy.hedge_min_delay)

    async def invoke(self, call: ShardCall[T]) -> T:
        self.in_flight += 1
        self.breaker.allow()  # claims the probe when the circuit is half-open
        start = time.perf_counter()
        try:
            result = await call(self.stub)
        except grpc.aio.AioRpcError as exc:
            if exc.code() in _REPLICA_FAULTS:
                if self.breaker.failure():
                    BREAKER_OPENED.labels(str(self.shard_id)).inc()
                    log.warning("circuit opened for shard %s replica %s", self.shard_id, self.target)
            else:
                self.breaker.abandoned()
            raise
        except asyncio.CancelledError:
            # A hedge's loser: it took at least this long. Without the sample a replica whose every call
            # loses its race would keep the latency record of its fast days and keep being picked.
            self.latencies.add(time.perf_counter() - start)
            self.breaker.abandoned()
            raise
        except BaseException:
            self.breaker.abandoned()
            raise
        finally:
            self.in_flight -= 1
        self.latencies.add(time.perf_counter() - start)
        self.breaker.success()
        return result

    async def close(self) -> None:
        await self.channel.close()
        if self.search_channel is not None:
            await self.search_channel.close()


_GENERATIONS = itertools.count(1)


class ReplicaSet:
    """The replicas of one shard, with selection, failover and hedging."""

    def __init__(self, shard_id: int, replicas: Iterable[Replica] = ()) -> None:
        self.shard_id = shard_id
        self.replicas = list(replicas)
        self._picks = 0

    @property
    def replicas(self) -> list[Replica]:
        return self._replicas

    @replicas.setter
    def replicas(self, replicas: list[Replica]) -> None:
        self._replicas = replicas
        self.generation = next(_GENERATIONS)  # tells the fan-out to regroup shards by their replicas

    def pick(self, exclude: Iterable[Replica] = ()) -> Replica | None:
        """A selectable replica, the one expected to answer first; None when there is none.

        Once every candidate has a latency record, the expected wait of each is (calls in flight + 1) x
        its median latency, so a replica that has turned slow (a noisy neighbour, a long GC, a slow disk)
        loses its share of the calls without failing any, and one call in ``EXPLORE_EVERY`` goes to the
        candidates in turn, so that a slow one that recovered is noticed. Until then: the fewest calls in
        flight, ties at random."""
        skip = set(map(id, exclude))
        candidates = [r for r in self.replicas if id(r) not in skip and r.selectable()]
        if len(candidates) <= 1:
            return candidates[0] if candidates else None
        if any(len(r.latencies) < r.policy.hedge_min_samples for r in candidates):
            fewest = min(r.in_flight for r in candidates)
            return random.choice([r for r in candidates if r.in_flight == fewest])
        self._picks += 1
        if self._picks % EXPLORE_EVERY == 0:
            return candidates[(self._picks // EXPLORE_EVERY) % len(candidates)]
        waits = [(r.in_flight + 1) * r.latencies.p50() for r in candidates]
        best = min(waits)
        return random.choice([r for r, w in zip(candidates, waits, strict=True) if w == best])

    def hedge_delay(self, primary: Replica) -> float | None:
        """When to hedge a call to ``primary``: at the p95 of the fastest measured replica of the set, so
        that a call that went to a slow replica is hedged as early as one to a fast one would be."""
        if not primary.policy.hedge:
            return None
        measured = [r.latencies.p95() for r in self.replicas
                    if r.selectable() and len(r.latencies) >= r.policy.hedge_min_samples]
        if not measured:
            return None
        return max(min(measured), primary.policy.hedge_min_delay)

    async def call(self, call: ShardCall[T]) -> T:
        """Run ``call`` on one replica; hedge it when slow, fail over once when it fails."""
        primary = self.pick()
        if primary is None:
            raise NoReplicaAvailable(f"shard {self.shard_id}: no healthy replica")
        first = asyncio.ensure_future(primary.invoke(call))
        try:
            done, _ = await asyncio.wait({first}, timeout=self.hedge_delay(primary))
        except BaseException:
            first.cancel()
            raise
        if done:
            if first.exception() is None:
                return first.result()
            backup = self.pick(exclude=(primary,))
            if backup is None:
                return first.result()  # re-raises the failure
            FAILOVERS.labels(str(self.shard_id)).inc()
            return await backup.invoke(call)
        backup = self.pick(exclude=(primary,))
        if backup is None:
            return await first
        HEDGED.labels(str(self.shard_id)).inc()
        return await _first_success([first, asyncio.ensure_future(backup.invoke(call))])


async def _first_success(tasks: list[asyncio.Future[T]]) -> T:
    """The result of the first task that succeeds; the last failure when all fail. Losers are cancelled."""
    pending = set(tasks)
    failure: BaseException | None = None
    try:
        while pending:
            done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                if task.exception() is None:
                    return task.result()
                failure = task.exception()
        assert failure is not None
        raise failure
    finally:
        for task in pending:
            task.cancel()


def parse_shard_spec(spec: str, var: str = "GMCO_ROUTER_SHARDS") -> dict[int, list[str]]:
    """``'0=h:p|h:p,1=h:p'`` → ``{0: ['h:p', 'h:p'], 1: ['h:p']}``; shard ids must be 0..n-1."""
    shards: dict[int, list[str]] = {}
    for part in filter(None, (p.strip() for p in spec.split(","))):
        sid, sep, targets = part.partition("=")
        if not sep or not sid.strip().isdigit():
            raise ConfigError(f"{var}: {part!r} is not '<shard>=<host:port>|<host:port>'")
        replicas = [t.strip() for t in targets.split("|") if t.strip()]
        if not replicas or any(":" not in t for t in replicas):
            raise ConfigError(f"{var}: shard {sid} needs at least one host:port")
        if int(sid) in shards:
            raise ConfigError(f"{var}: shard {sid} is listed twice")
        shards[int(sid)] = replicas
    if sorted(shards) != list(range(len(shards))) or not shards:
        raise ConfigError(f"{var}: shard ids must be 0..n-1 with none missing, got {sorted(shards)}")
    return shards


async def resolve_dns(template: str, shard_id: int) -> list[str]:
    """Every address that ``template`` (with ``{shard}``) resolves to, as sorted host:port strings."""
    host, _, port = template.format(shard=shard_id).rpartition(":")
    infos = await asyncio.get_running_loop().getaddrinfo(host, int(port), type=socket.SOCK_STREAM)
    return sorted({f"{info[4][0]}:{port}" for info in infos})


class ShardPool:
    """Every shard's replicas, kept current by background health checks (and DNS refreshes)."""

    def __init__(self, targets: Mapping[int, list[str]], policy: ReplicaPolicy,
                 channel_options: ChannelOptions, dns_template: str = "", dns_refresh: float = 10.0) -> None:
        self._policy = policy
        self._channel_options = channel_options
        self._dns_template = dns_template
        self._dns_refresh = dns_refresh
        self.shards: dict[int, ReplicaSet] = {sid: ReplicaSet(sid) for sid in targets}
        self._closing: set[asyncio.Future[None]] = set()
        for sid, shard_targets in targets.items():
            self.set_targets(sid, shard_targets)
        self._background = Supervisor()

    @classmethod
    def from_dns(cls, template: str, shard_count: int, policy: ReplicaPolicy, channel_options: ChannelOptions,
                 refresh: float) -> ShardPool:
        return cls({sid: [] for sid in range(shard_count)}, policy, channel_options, template, refresh)

    @property
    def channel_options(self) -> ChannelOptions:
        return self._channel_options

    @property
    def shard_count(self) -> int:
        return len(self.shards)

    def set_targets(self, shard_id: int, targets: Iterable[str]) -> None:
        """Make ``targets`` the replicas of ``shard_id``, keeping the state of those already known."""
        rset = self.shards[shard_id]
        wanted = list(dict.fromkeys(targets))
        known = {r.target: r for r in rset.replicas}
        for gone in set(known) - set(wanted):  # only DNS refreshes remove replicas, inside the loop
            self._closing.add(asyncio.ensure_future(known[gone].close()))
            REPLICA_HEALTHY.remove(str(shard_id), gone)
        rset.replicas = [known.get(t) or self._new_replica(shard_id, t) for t in wanted]

    def _new_replica(self, shard_id: int, target: str) -> Replica:
        REPLICA_HEALTHY.labels(str(shard_id), target).set(1)
        return Replica(shard_id, target, make_channel(target, self._channel_options), self._policy,
                       search_channel=search_channel(target, self._channel_options))

    async def __aenter__(self) -> Self:
        if self._dns_template:
            await self._refresh_dns()
            self._background.every("shard-dns-refresh", self._dns_refresh, self._refresh_dns)
        await self.check_health()
        self._background.every("shard-health-checks", self._policy.health_interval, self.check_health)
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._background.close()
        await asyncio.gather(*self._closing, *(r.close() for s in self.shards.values() for r in s.replicas))

    async def _refresh_dns(self) -> None:
        for sid in self.shards:
            try:
                targets = await resolve_dns(self._dns_template, sid)
            except OSError as exc:
                log.warning("DNS for shard %s failed (%s); keeping %d replicas", sid, exc,
                            len(self.shards[sid].replicas))
                continue
            self.set_targets(sid, targets)

    async def check_health(self) -> None:
        """One health check per target: a process serving several logical shards is asked once."""
        by_target: dict[str, list[Replica]] = {}
        for rset in self.shards.values():
            for r in rset.replicas:
                by_target.setdefault(r.target, []).append(r)
        await asyncio.gather(*(self._check(replicas) for replicas in by_target.values()))

    async def _check(self, replicas: list[Replica]) -> None:
        timeout = min(self._policy.health_interval, 1.0)
        try:
            resp = await health_pb2_grpc.HealthStub(replicas[0].channel).Check(
                health_pb2.HealthCheckRequest(service=SHARD_SERVICE), timeout=timeout)
            healthy = resp.status == health_pb2.HealthCheckResponse.SERVING
        except grpc.aio.AioRpcError:
            healthy = False
        for replica in replicas:
            if healthy != replica.healthy:
                log.warning("shard %s replica %s is now %s", replica.shard_id, replica.target,
                            "healthy" if healthy else "unhealthy")
            replica.healthy = healthy
            REPLICA_HEALTHY.labels(str(replica.shard_id), replica.target).set(int(healthy))

