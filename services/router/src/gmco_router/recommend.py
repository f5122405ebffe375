"""The Recommend flow of shared/DESIGN.md ("Request path"), for one request or a batch.

Cache key. A cached list is stored under (user, context hash, user-state version); the context hash is
``gmco_common.cache_key.context_hash`` of (context, preferences, k), so the cache is asked before the
ontology. The version comes from an in-process map user -> version, filled from every GetUserState, Rank
and RecordFeedback answer this router sees and trusted for ``user_version_ttl`` seconds. Envoy keeps a user
on one router, and feedback for the user passes through that router, so the map is exact in the normal
case and a feedback makes the old key unreachable at once; after a failover to another router, an entry
older than the TTL is re-read from rl_state. When the version is unknown, GetUserState runs first.

Miss path. User state, constraints and the video-page anchor are fetched concurrently; the user state
comes from this router's own LRU when it holds it at the version the router knows (same trust as the cache
key: Envoy keeps a user on one router, feedback bumps the version), else from GetUserState. Concurrent misses
share one ``Search`` per shard (a batch with one filter per query row: each user's seen items differ), as
one RecommendBatch does: a miss goes at once when no Search of its kind is in flight from this router,
else with the others that arrive before that one returns, waiting at most ``batch_window_ms``
(SearchBatcher). Shards answer in columns (ids, scores,
popularity) with each candidate's bandit features (32 floats, not its 1024-d vector); candidates are
merged per request with numpy; rl_state ranks from the features, the misses that shared a Search in one
RankBatch call (``rank_batch``; a refused entry sends them one by one, so only its own request fails). A user without state (and no anchor)
gets the most popular allowed items of every shard instead of a search for a zero vector. The answer is
sent before the list is written to the cache service: that put runs in the background, bounded by
``cache_put_max_pending`` (a put that does not fit is dropped and counted, never an error to anyone), and
puts made within ``cache_put_window_ms`` of each other share one call (gmco_router.puts).
Concurrent identical misses (same user, context, k and version) share one computation (single-flight).

Router-local lists. In front of the cache service each router keeps an LRU of the lists it computed or
fetched (``list_cache_entries``, ``list_cache_ttl_seconds``), under the same key; since Envoy's ring hash
keeps a user on one router, most hits are answered there without the cache service's round trip.

Degradation. A failed cache lookup or put is a miss (component "cache"). A failed GetUserState or Rank
gives "rl_state": the user is served as a cold start, and candidates keep their retrieval order. A failed
ontology gives "ontology": the last filter compiled for the same context is used when there is one,
otherwise only recently seen items are filtered. A shard with no replica that answers gives "shard-<id>".
With no shard at all the call fails UNAVAILABLE. A dependency's verdict on the input (INVALID_ARGUMENT:
an unknown region, say) is the caller's error and is passed through, never degraded.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc
import numpy as np
from gmco.cache.v1 import cache_service_pb2, cache_service_pb2_grpc
from gmco.common.v1 import common_pb2
from gmco.ontology.v1 import ontology_service_pb2, ontology_service_pb2_grpc
from gmco.rl_state.v1 import rl_state_service_pb2, rl_state_service_pb2_grpc
from gmco.router.v1 import router_service_pb2
from gmco.shard.v1 import shard_service_pb2
from gmco_common.cache_key import context_hash, context_key
from gmco_common.context import budget, time_remaining
from gmco_common.errors import DeadlineExceeded, Unavailable, from_rpc_error, is_dependency_failure
from gmco_common.ids import MAX_RANK_BATCH
from gmco_common.lru import TtlLru
from gmco_common.vectors import decode_vector, encode_batch, normalize
from prometheus_client import Counter, Histogram

from gmco_router.catalogue import Catalogue
from gmco_router.config import Settings
from gmco_router.fanout import Answers, FanOut, merge_columns
from gmco_router.local import SingleFlight
from gmco_router.puts import CachePuts
from gmco_router.replicas import NoReplicaAvailable, ShardPool

log = logging.getLogger(__name__)

STAGE_SECONDS = Histogram(
    "gmco_router_stage_seconds", "Time spent in each stage of Recommend (cache_put: after the reply).", ["stage"],
    buckets=(0.0002, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 1.0),
)
CACHE_LOOKUPS = Counter("gmco_router_cache_lookups_total", "Recommendation cache lookups by result.", ["result"])
STATE_READS = Counter("gmco_router_user_state_reads_total",
                      "User states a miss used, by source: local (this router's LRU, at the known version) or "
                      "rl_state (GetUserState).", ["source"])
DEGRADED = Counter("gmco_router_degraded_total", "Answers that skipped a component, by component.",
                   ["component"])
SEARCH_ROWS = Histogram("gmco_router_search_batch_rows", "Query rows per shard Search (misses sharing a call).",
                        buckets=(1, 2, 4, 8, 16, 32, 64, 128))

FlightKey = tuple[str, str, int | None]
MAX_PUT_BATCH = 64  # lists in one PutRecommendationsBatch (the cache's own limit is GMCO_CACHE_MAX_BATCH_KEYS)
_EMPTY_F32 = np.empty(0, np.float32)


@dataclass(frozen=True)
class Outcome:
    """What a computation produced; shared by single-flight followers."""

    items: tuple[common_pb2.ScoredItem, ...]
    policy: str
    user_version: int
    degraded: frozenset[str] = frozenset()


@dataclass
class Candidates:
    """The merged candidates of one request, best first (columns)."""

    media_ids: np.ndarray  # uint64
    scores: np.ndarray  # float32: similarity, or popularity for a cold start
    popularities: np.ndarray  # float32
    features: np.ndarray  # float32 (n, d)
    shard_ids: np.ndarray  # int32
    feature_version: str = ""

    def __len__(self) -> int:
        return int(self.media_ids.shape[0])


class Plan:
    """One request on its way through the flow."""

    def __init__(self, user_id: str, request: router_service_pb2.RecommendRequest, field_prefix: str) -> None:
        self.user_id = user_id
        self.request = request
        self.field_prefix = field_prefix
        self.context_key = context_key(request.context, request.preferences)
        self.context_hash = context_hash(request.context, request.preferences, request.k)
        self.version: int | None = None
        self.state: rl_state_service_pb2.UserState | None = None
        self.state_failed = False
        self.filter = common_pb2.Filter()
        self.anchor: np.ndarray | None = None
        self.query: np.ndarray | None = None  # None: a cold start, searched by popularity
        self.candidates: Candidates | None = None
        self.no_shard = False
        self.error: Exception | None = None  # this request's own failure, found while its group was served
        self.outcome: Outcome | None = None
        self.cache_hit = False
        self.degraded: set[str] = set()
        self.timings: list[router_service_pb2.StageTiming] = []

    @property
    def flight_key(self) -> FlightKey:
        return (self.user_id, self.context_hash, self.version)

    def degrade(self, component: str) -> None:
        if component not in self.degraded:
            self.degraded.add(component)
            DEGRADED.labels(component).inc()

    def record(self, stage: str, seconds: float) -> None:
        self.timings.append(router_service_pb2.StageTiming(stage=stage, seconds=seconds))
        STAGE_SECONDS.labels(stage).observe(seconds)

    @contextlib.contextmanager
    def stage(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.record(name, time.perf_counter() - start)

    def dependency_failed(self, exc: grpc.aio.AioRpcError, dependency: str, component: str) -> None:
        """Degrade for a failed dependency; raise when the dependency says the caller's input is bad."""
        error = from_rpc_error(exc, dependency, self.field_prefix)
        if not is_dependency_failure(error):
            raise error from None
        log.warning("%s failed: %s", dependency, exc.code().name)
        self.degrade(component)

    def search_filter(self, seen_max: int) -> common_pb2.Filter:
        """The compiled filter plus this user's recently seen items (never recommended again)."""
        if self.state is None or not self.state.seen_media_ids:
            return self.filter
        f = common_pb2.Filter()
        f.CopyFrom(self.filter)
        f.excluded_media_ids.extend(self.state.seen_media_ids[:seen_max])
        return f

    def response(self, router_id: str) -> router_service_pb2.RecommendResponse:
        assert self.outcome is not None
        degraded = sorted(self.degraded | self.outcome.degraded)
        return router_service_pb2.RecommendResponse(
            items=self.outcome.items, cache_hit=self.cache_hit, degraded=bool(degraded),
            degraded_components=degraded, timings=self.timings, user_version=self.outcome.user_version,
            router_id=router_id, policy=self.outcome.policy, user_id=self.user_id,
        )


async def run_all(*aws: Awaitable[Any]) -> list[Any]:
    """``gather`` that cancels the others when one fails, so no work outlives a failed request."""
    if len(aws) == 1:  # the common single-request case: no task to create
        return [await aws[0]]
    tasks = [asyncio.ensure_future(a) for a in aws]
    try:
        return await asyncio.gather(*tasks)
    except BaseException:
        for task in tasks:
            task.cancel()
        raise


@dataclass
class _Group:
    plans: list[Plan] = field(default_factory=list)
    futures: list[asyncio.Future[None]] = field(default_factory=list)
    rows: int = 0
    timer: asyncio.TimerHandle | None = None


class SearchBatcher:
    """Concurrent misses go to the shards together, one Search per shard for the group.

    Requests are grouped by what one SearchRequest can carry only once (the order: similarity or
    popularity, and min_lsn); filters travel per query row. A miss is sent at once when no Search of its
    group is in flight from this router, so an idle router adds no wait. Otherwise it waits for that Search
    to return, and the misses that arrived meanwhile go together in the next one (group commit): the
    busier the shards, the more rows share a call, and a shard's fixed cost per call is about its cost per
    row (docs/benchmarks.md). A miss never waits more than ``window`` seconds, and a group is sent at
    once when it holds ``max_rows`` rows; ``window`` 0 sends every miss alone, at once."""

    def __init__(self, run: Callable[[list[Plan]], Awaitable[None]], window: float, max_rows: int) -> None:
        self._run = run
        self._window = window
        self._max = max_rows
        self._groups: dict[tuple, _Group] = {}
        self._in_flight: dict[tuple, int] = {}
        self._tasks: set[asyncio.Task[None]] = set()

    async def search(self, plans: list[Plan]) -> None:
        if self._window <= 0 or len(plans) >= self._max:
            await self._run(plans)
            return
        loop = asyncio.get_running_loop()
        waits = []
        for p in plans:
            key = (p.query is None, p.request.min_lsn)
            group = self._groups.get(key)
            if group is None:
                group = self._groups[key] = _Group()
            fut: asyncio.Future[None] = loop.create_future()
            group.plans.append(p)
            group.futures.append(fut)
            group.rows += 1
            waits.append(fut)
            if group.rows >= self._max or not self._in_flight.get(key):
                self._flush(key)
            elif group.timer is None:
                group.timer = loop.call_later(self._window, self._flush, key)
        await asyncio.gather(*waits)

    def _flush(self, key: tuple) -> None:
        group = self._groups.pop(key, None)
        if group is None:
            return
        if group.timer is not None:
            group.timer.cancel()
        self._in_flight[key] = self._in_flight.get(key, 0) + 1
        task = asyncio.ensure_future(self._execute(key, group))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _execute(self, key: tuple, group: _Group) -> None:
        try:
            await self._run(group.plans)
        except BaseException as exc:  # every caller of the group gets the error
            for fut in group.futures:
                if not fut.done():
                    fut.set_exception(exc if isinstance(exc, Exception) else Unavailable("search cancelled"))
                    fut.exception()
            if not isinstance(exc, Exception):
                raise
            return
        finally:
            left = self._in_flight[key] - 1
            if left:
                self._in_flight[key] = left
            else:
                del self._in_flight[key]
            if key in self._groups:  # the misses that waited for this Search go now
                self._flush(key)
        for fut in group.futures:
            if not fut.done():
                fut.set_result(None)


def merge(answers: Answers, row: int, limit: int,
          feature_dim: int = 0) -> Candidates:
    """The global top-``limit`` of one query row over every shard's answer, best score first, each id once
    (``feature_dim``: the width of the zero features given to candidates whose shard sent none)."""
    return Candidates(*merge_columns(answers, row, limit, feature_dim))


class Recommender:
    def __init__(self, settings: Settings, pool: ShardPool, catalogue: Catalogue,
                 cache: cache_service_pb2_grpc.CacheServiceStub,
                 ontology: ontology_service_pb2_grpc.OntologyServiceStub,
                 rl_state: rl_state_service_pb2_grpc.RLStateServiceStub) -> None:
        self._s = settings
        self._pool = pool
        self._catalogue = catalogue
        self._cache = cache
        self._ontology = ontology
        self._rl = rl_state
        self._versions: TtlLru[str, int] = TtlLru(settings.local_cache_entries, settings.user_version_ttl_seconds)
        # A user's state at the version it was read at: valid while that is still the known version.
        self._states: TtlLru[str, rl_state_service_pb2.UserState] | None = (
            TtlLru(settings.user_state_cache_entries, settings.user_version_ttl_seconds)
            if settings.user_state_cache_entries else None)
        self._filters: TtlLru[str, common_pb2.Filter] = TtlLru(settings.local_cache_entries,
                                                              settings.filter_cache_ttl_seconds)
        # L1 in front of the cache service, under the same (user, context, version) key.
        self._lists: TtlLru[FlightKey, Outcome] | None = (
            TtlLru(settings.list_cache_entries, settings.list_cache_ttl_seconds) if settings.list_cache_entries
            else None)
        self._flights: SingleFlight[FlightKey, Outcome] = SingleFlight()
        self._batcher = SearchBatcher(self._retrieve, settings.batch_window_ms / 1000, settings.batch_max)
        self._rank_batch = settings.rank_batch
        self._fanout = FanOut(pool.shards, pool.channel_options)
        self._puts = CachePuts(cache, settings.cache_put_window_ms / 1000, settings.cache_put_max_pending,
                               MAX_PUT_BATCH, settings.call_timeout_seconds,
                               STAGE_SECONDS.labels("cache_put").observe)
        self._dimension: int | None = None

    def note_version(self, user_id: str, version: int) -> None:
        """Remember a user's state version (from feedback, state reads or ranking)."""
        known = self._versions.get_stale(user_id)
        if known is None or version >= known:
            self._versions.put(user_id, version)

    def candidate_count(self, k: int) -> int:
        """k': how many candidates each shard returns for a request of k."""
        return min(self._s.shard_max_k, max(self._s.min_candidates, math.ceil(k * self._s.overfetch)))

    async def close(self) -> None:
        """Let the background cache puts finish (at shutdown; bounded by their own deadlines)."""
        await self._puts.close()

    # -- entry point -----------------------------------------------------------------------------------

    async def recommend(self, requests: Sequence[tuple[str, router_service_pb2.RecommendRequest]],
                        batched: bool) -> list[router_service_pb2.RecommendResponse]:
        plans = [Plan(user, req, f"requests[{i}]: " if batched else "") for i, (user, req) in enumerate(requests)]
        await run_all(*(self._lookup(p) for p in plans))
        leaders: list[Plan] = []
        followers: list[Awaitable[None]] = []
        for p in plans:
            if p.outcome is not None:
                continue
            flight = self._flights.join(p.flight_key)
            if flight is None:
                self._flights.lead(p.flight_key)
                leaders.append(p)
            else:
                followers.append(self._follow(p, flight))
        await run_all(self._lead(leaders, batched), *followers)
        for p in leaders:
            self._store(p)
        return [p.response(self._s.router_id) for p in plans]

    async def _lead(self, plans: list[Plan], batched: bool) -> None:
        if not plans:
            return
        try:
            await self._compute(plans, batched)
        except BaseException as exc:
            error = exc if isinstance(exc, Exception) else Unavailable("the shared computation was cancelled")
            for p in plans:
                self._flights.land(p.flight_key, error=error)
            raise
        for p in plans:
            self._flights.land(p.flight_key, result=p.outcome)

    async def _follow(self, p: Plan, flight: asyncio.Future[Outcome]) -> None:
        try:
            p.outcome = await asyncio.shield(flight)
        except Exception:  # noqa: BLE001 - the leader failed; compute for this request alone
            await self._compute([p], batched=False)

    # -- stage 1: cache --------------------------------------------------------------------------------

    async def _lookup(self, p: Plan) -> None:
        p.version = self._versions.get(p.user_id)
        if p.version is None:
            await self._user_state(p)
        if p.request.skip_cache or p.version is None:
            return
        if self._lists is not None:
            with p.stage("local_cache_get"):
                local = self._lists.get(p.flight_key)
            if local is not None:
                CACHE_LOOKUPS.labels("local_hit").inc()
                p.cache_hit = True
                p.outcome = local
                return
        with p.stage("cache_get"):
            try:
                resp = await self._cache.GetRecommendations(cache_service_pb2.GetRecommendationsRequest(
                    user_id=p.user_id, context_hash=p.context_hash, user_version=p.version),
                    timeout=budget(self._s.cache_timeout_ms / 1000))
            except grpc.aio.AioRpcError as exc:
                log.warning("cache lookup failed: %s", exc.code().name)
                CACHE_LOOKUPS.labels("error").inc()
                p.degrade("cache")
                return
        if resp.bypassed:
            p.degrade("cache")
        CACHE_LOOKUPS.labels("hit" if resp.hit else "bypass" if resp.bypassed else "miss").inc()
        if resp.hit:
            p.cache_hit = True
            p.outcome = Outcome(tuple(resp.recommendations.items), "", p.version)
            if self._lists is not None:
                self._lists.put(p.flight_key, p.outcome)

    # -- stages 2-3: user state, constraints (and the anchor item), concurrently -----------------------

    async def _user_state(self, p: Plan) -> None:
        with p.stage("user_state"):
            try:
                resp = await self._rl.GetUserState(rl_state_service_pb2.GetUserStateRequest(user_id=p.user_id),
                                                   timeout=budget(self._s.rl_state_timeout_ms / 1000))
            except grpc.aio.AioRpcError as exc:
                p.dependency_failed(exc, "rl_state GetUserState", "rl_state")
                p.state_failed = True
                return
        p.state = resp.state
        p.version = resp.state.version
        self.note_version(p.user_id, p.version)
        STATE_READS.labels("rl_state").inc()
        if self._states is not None:
            self._states.put(p.user_id, resp.state)

    def _known_state(self, p: Plan) -> bool:
        """Use this router's copy of the user's state when it is at the version the router knows (feedback
        through this router bumps that version, so a state it changed is never used)."""
        if self._states is None or p.version is None:
            return False
        state = self._states.get(p.user_id)
        if state is None or state.version != p.version:
            return False
        p.state = state
        STATE_READS.labels("local").inc()
        return True

    async def _constraints(self, p: Plan) -> None:
        with p.stage("constraints"):
            compiled = self._filters.get(p.context_key)
            if compiled is None:
                try:
                    resp = await self._ontology.ResolveConstraints(ontology_service_pb2.ResolveConstraintsRequest(
                        context=p.request.context, preferences=p.request.preferences),
                        timeout=budget(self._s.ontology_timeout_ms / 1000))
                except grpc.aio.AioRpcError as exc:
                    p.dependency_failed(exc, "ontology ResolveConstraints", "ontology")
                    compiled = self._filters.get_stale(p.context_key) or common_pb2.Filter()
                else:
                    compiled = resp.filter
                    self._filters.put(p.context_key, compiled)
        p.filter = compiled

    async def _anchor(self, p: Plan) -> None:
        anchor_id = p.request.context.anchor_media_id
        if p.request.context.surface != common_pb2.SURFACE_VIDEO_PAGE or not anchor_id:
            return
        item = (await self._catalogue.get_media([anchor_id])).get(anchor_id)
        if item is not None and item.vector.dimension:
            p.anchor = normalize(decode_vector(item.vector, "anchor"))

    async def _prepare(self, p: Plan) -> None:
        jobs = [self._constraints(p), self._anchor(p)]
        if p.state is None and not p.state_failed and not self._known_state(p):
            jobs.append(self._user_state(p))
        await run_all(*jobs)
        p.query = self._query_vector(p)

    @staticmethod
    def _query_vector(p: Plan) -> np.ndarray | None:
        """The user's vector, blended with the anchor item on a video page; None when neither exists (a
        cold start: the shards return their most popular allowed items)."""
        user = None
        if p.state is not None and p.state.vector.dimension:
            user = normalize(decode_vector(p.state.vector, "user_state.vector"))
            if not user.any():
                user = None
        if user is not None and p.anchor is not None:
            return normalize(user + p.anchor)
        return user if user is not None else p.anchor

    async def _catalogue_dimension(self) -> int:
        if self._dimension is None:
            for rset in self._pool.shards.values():
                try:
                    stats = await rset.call(lambda stub: stub.GetStats(shard_service_pb2.GetStatsRequest()))
                except (grpc.aio.AioRpcError, NoReplicaAvailable):
                    continue
                self._dimension = stats.dimension
                break
            else:
                raise Unavailable("no shard answered GetStats; retry later")
        return self._dimension

    # -- stages 4-6 --------------------------------------------------------------------------------------

    async def _compute(self, plans: list[Plan], batched: bool) -> None:
        await run_all(*(self._prepare(p) for p in plans))
        if batched:  # the caller's batch is one search already; split only what one call cannot carry
            groups: dict[tuple, list[Plan]] = {}
            for p in plans:
                groups.setdefault((p.query is None, p.request.min_lsn), []).append(p)
            await run_all(*(self._retrieve(group) for group in groups.values()))
        else:
            await self._batcher.search(plans)
        if any(p.no_shard for p in plans):
            if time_remaining() == 0:
                raise DeadlineExceeded("the deadline passed while searching the shards")
            raise Unavailable("no shard could answer; retry later")
        for p in plans:
            if p.error is not None:
                raise p.error

    async def _retrieve(self, plans: list[Plan]) -> None:
        """Search, then rank, for a group of misses: those that shared a Search share the RankBatch too."""
        await self._search(plans)
        await self._rank_all(plans)

    async def _search(self, plans: list[Plan]) -> None:
        """One Search per shard for every request of the group, each with its own filter."""
        cold = plans[0].query is None
        dim = await self._catalogue_dimension() if cold else plans[0].query.shape[0]  # type: ignore[union-attr]
        queries = np.zeros((len(plans), dim), np.float32)
        if not cold:
            for i, p in enumerate(plans):
                queries[i] = p.query
        filters = [p.search_filter(self._s.excluded_seen_max) for p in plans]
        k_prime = max(self.candidate_count(p.request.k) for p in plans)
        request = shard_service_pb2.SearchRequest(
            queries=encode_batch(queries, "float16"), k=k_prime, min_lsn=plans[0].request.min_lsn,
            include_features=True, columnar=True,
            order=shard_service_pb2.SEARCH_ORDER_POPULARITY if cold else shard_service_pb2.SEARCH_ORDER_UNSPECIFIED)
        if len(plans) == 1:
            request.filter.CopyFrom(filters[0])
        else:
            request.query_filters.extend(filters)
        SEARCH_ROWS.observe(len(plans))
        start = time.perf_counter()
        answers = await self._fanout.search(self._fanout.prepare(request))  # gmco_router.fanout
        elapsed = time.perf_counter() - start
        for i, p in enumerate(plans):
            p.record("shard_search", elapsed)
            for shard_ids, answer in answers.items():
                if answer is None:
                    for shard_id in shard_ids:
                        p.degrade(f"shard-{shard_id}")
            p.no_shard = all(a is None for a in answers.values())
            with p.stage("merge"):
                p.candidates = merge(answers, i, self.candidate_count(p.request.k))

    async def _rank_all(self, plans: list[Plan]) -> None:
        """Rank every plan that has candidates: one RankBatch for all of them (rank_batch), else one Rank each."""
        todo = []
        for p in plans:
            if p.no_shard:
                continue
            if p.candidates is None or not len(p.candidates):
                p.outcome = Outcome((), "none", p.version or 0)
            else:
                todo.append(p)
        if len(todo) < 2 or not self._rank_batch:
            await run_all(*(self._rank(p) for p in todo))
            return
        await run_all(*(self._rank_batched(todo[i:i + MAX_RANK_BATCH]) for i in range(0, len(todo), MAX_RANK_BATCH)))

    async def _rank_batched(self, plans: list[Plan]) -> None:
        request = rl_state_service_pb2.RankBatchRequest(requests=[self._rank_request(p) for p in plans])
        start = time.perf_counter()
        try:
            resp = await self._rl.RankBatch(request, timeout=budget(self._s.rl_state_timeout_ms / 1000))
        except grpc.aio.AioRpcError as exc:
            if exc.code() == grpc.StatusCode.UNIMPLEMENTED:  # an older rl_state: ask it one by one from now on
                log.warning("rl_state has no RankBatch; ranking one request per call")
                self._rank_batch = False
            elif is_dependency_failure(from_rpc_error(exc, "rl_state RankBatch")):
                elapsed = time.perf_counter() - start
                for p in plans:
                    p.record("rank", elapsed)
                    self._rank_failed(p, exc)  # a dependency failure: degrades, never raises
                return
            # Else one entry's input was refused (and so the whole call): each request gets its own verdict.
            await run_all(*(self._rank(p) for p in plans))
            return
        elapsed = time.perf_counter() - start
        for p, answer in zip(plans, resp.responses, strict=True):
            p.record("rank", elapsed)
            self._ranked(p, answer)

    async def _rank(self, p: Plan) -> None:
        """One Rank call; a refusal of this request's input is kept as its own error (``p.error``), so that
        the other requests of its group are still answered."""
        with p.stage("rank"):
            try:
                resp = await self._rl.Rank(self._rank_request(p), timeout=budget(self._s.rl_state_timeout_ms / 1000))
            except grpc.aio.AioRpcError as exc:
                try:
                    self._rank_failed(p, exc)
                except Exception as refused:  # noqa: BLE001 - rl_state's verdict on this request's input
                    p.error = refused
                return
        self._ranked(p, resp)

    @staticmethod
    def _rank_request(p: Plan) -> rl_state_service_pb2.RankRequest:
        c = p.candidates
        assert c is not None
        return rl_state_service_pb2.RankRequest(
            user_id=p.user_id, context=p.request.context, k=min(p.request.k, len(c)),
            candidate_media_ids=c.media_ids.tolist(), retrieval_scores=c.scores.tolist(),
            popularities=c.popularities.tolist(), feature_version=c.feature_version,
            candidate_features=encode_batch(c.features, "float32"),
        )

    @staticmethod
    def _rank_failed(p: Plan, exc: grpc.aio.AioRpcError) -> None:
        """rl_state could not rank: the candidates in retrieval order (raises when the input was refused)."""
        p.dependency_failed(exc, "rl_state Rank", "rl_state")
        c = p.candidates
        assert c is not None
        top = slice(0, p.request.k)
        p.outcome = Outcome(tuple(common_pb2.ScoredItem(media_id=m, score=s, propensity=1.0, shard_id=sh)
                                  for m, s, sh in zip(c.media_ids[top].tolist(), c.scores[top].tolist(),
                                                      c.shard_ids[top].tolist(), strict=True)),
                            "retrieval_order", p.version or 0)

    def _ranked(self, p: Plan, resp: rl_state_service_pb2.RankResponse) -> None:
        c = p.candidates
        assert c is not None
        if resp.degraded:
            p.degrade("rl_state")
        if resp.user_version:
            self.note_version(p.user_id, resp.user_version)
        shard_of = dict(zip(c.media_ids.tolist(), c.shard_ids.tolist(), strict=True))
        items = tuple(common_pb2.ScoredItem(media_id=i.media_id, score=i.score, exploration=i.exploration,
                                            propensity=i.propensity, shard_id=shard_of.get(i.media_id, i.shard_id))
                      for i in resp.items)
        p.outcome = Outcome(items, resp.policy, p.version or 0)

    # -- stage 7, after the reply: the cache ----------------------------------------------------------

    def _store(self, p: Plan) -> None:
        """Keep the list in this router's LRU now and write it to the cache service in the background."""
        # A degraded answer is not cached: it would outlive the failure for the whole TTL.
        if p.version is None or p.degraded - {"cache"} or p.outcome is None:
            return
        if self._lists is not None:
            self._lists.put(p.flight_key, p.outcome)
        self._puts.submit(cache_service_pb2.PutRecommendationsRequest(
            user_id=p.user_id, context_hash=p.context_hash, user_version=p.version,
            recommendations=cache_service_pb2.RecommendationList(
                items=p.outcome.items, computed_at_unix_ms=int(time.time() * 1000)),
            ttl_seconds=self._s.cache_ttl_seconds))
