"""The Recommend flow of shared/DESIGN.md ("Request path"), for one request or a batch.

Cache key. A cached list is stored under (user, context hash, user-state version). The context hash is
computed here from the canonical bytes of (context, preferences) and k, so the cache is asked first,
before the ontology. The version comes from an in-process map user → version, filled from every
GetUserState, Rank and RecordFeedback answer this router sees and trusted for ``user_version_ttl``
seconds. Envoy keeps a user on one router, and feedback for the user passes through that router, so
the map is exact in the normal case and a feedback makes the old key unreachable at once; after a
failover to another router, an entry older than the TTL is re-read from rl_state. When the version is
unknown, GetUserState runs first and its version makes the key. A change of ontology reaches cached
lists within the cache TTL, and compiled filters within ``filter_cache_ttl``.

Miss path: user state, constraints and the video-page anchor are fetched concurrently; the shards are
searched with one Search per shard for the whole batch (grouped by filter); per-request top-k' lists are
merged; rl_state ranks each; the result is cached unless the answer is degraded. Concurrent identical
misses (same user, context, k and version) share one computation (single-flight).

Router-local lists. In front of the cache service each router keeps an LRU of the lists it computed or
fetched (``list_cache_entries``, ``list_cache_ttl_seconds``), under the same key; since Envoy's ring hash
keeps a user on one router, most hits are answered there without the cache service's round trip. An
entry can outlive its cache-service copy by at most ``list_cache_ttl_seconds``.

Degradation. A failed cache lookup or put is a miss (component "cache"). A failed GetUserState or Rank
gives "rl_state": the query falls back to the anchor item or a zero vector, and candidates keep their
retrieval order. A failed ontology gives "ontology": the last filter compiled for the same context is
used when there is one, otherwise only recently seen items are filtered. A shard with no replica that
answers gives "shard-<id>". With no shard at all the call fails UNAVAILABLE. INVALID_ARGUMENT from a
dependency (an unknown region, say) is the caller's error and is passed through, never degraded.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import math
import time
from collections.abc import Awaitable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import grpc
import numpy as np
from gmco.cache.v1 import cache_service_pb2, cache_service_pb2_grpc
from gmco.common.v1 import common_pb2
from gmco.ontology.v1 import ontology_service_pb2, ontology_service_pb2_grpc
from gmco.rl_state.v1 import rl_state_service_pb2, rl_state_service_pb2_grpc
from gmco.router.v1 import router_service_pb2
from gmco.shard.v1 import shard_service_pb2
from gmco_common.context import time_remaining
from gmco_common.errors import DeadlineExceeded, Unavailable, from_rpc_error, is_dependency_failure
from gmco_common.lru import TtlLru
from gmco_common.vectors import decode_vector, encode_batch, normalize
from prometheus_client import Counter, Histogram

from gmco_router.catalogue import Catalogue
from gmco_router.config import Settings
from gmco_router.local import SingleFlight
from gmco_router.replicas import NoReplicaAvailable, ShardPool

log = logging.getLogger(__name__)

STAGE_SECONDS = Histogram(
    "gmco_router_stage_seconds", "Time spent in each stage of Recommend.", ["stage"],
    buckets=(0.0002, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 1.0),
)
CACHE_LOOKUPS = Counter("gmco_router_cache_lookups_total", "Recommendation cache lookups by result.", ["result"])
DEGRADED = Counter("gmco_router_degraded_total", "Answers that skipped a component, by component.",
                   ["component"])

FlightKey = tuple[str, str, int | None]


@dataclass(frozen=True)
class Outcome:
    """What a computation produced; shared by single-flight followers."""

    items: tuple[common_pb2.ScoredItem, ...]
    policy: str
    user_version: int
    degraded: frozenset[str] = frozenset()


class Plan:
    """One request on its way through the flow."""

    def __init__(self, user_id: str, request: router_service_pb2.RecommendRequest, field_prefix: str) -> None:
        self.user_id = user_id
        self.request = request
        self.field_prefix = field_prefix
        self.context_key = context_key(request.context, request.preferences)
        self.context_hash = f"{self.context_key}:k{request.k}"
        self.version: int | None = None
        self.state: rl_state_service_pb2.UserState | None = None
        self.state_failed = False
        self.filter = common_pb2.Filter()
        self.anchor: np.ndarray | None = None
        self.query: np.ndarray | None = None
        self.candidates: list[common_pb2.ScoredItem] = []
        self.no_shard = False
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

    def response(self, router_id: str) -> router_service_pb2.RecommendResponse:
        assert self.outcome is not None
        degraded = sorted(self.degraded | self.outcome.degraded)
        return router_service_pb2.RecommendResponse(
            items=self.outcome.items, cache_hit=self.cache_hit, degraded=bool(degraded),
            degraded_components=degraded, timings=self.timings, user_version=self.outcome.user_version,
            router_id=router_id, policy=self.outcome.policy, user_id=self.user_id,
        )


def context_key(context: common_pb2.RequestContext, preferences: common_pb2.UserPreferences) -> str:
    """A stable hash of the context and the (order-insensitive) preferences."""
    prefs = common_pb2.UserPreferences(blocked_genres=sorted(set(preferences.blocked_genres)),
                                       allowed_genres=sorted(set(preferences.allowed_genres)))
    digest = hashlib.blake2b(digest_size=12)
    digest.update(context.SerializeToString(deterministic=True))
    digest.update(b"\x00")
    digest.update(prefs.SerializeToString(deterministic=True))
    return digest.hexdigest()


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


def _lean(item: common_pb2.ScoredItem, **overrides: Any) -> common_pb2.ScoredItem:
    """The item without its vector and attributes (what callers and the cache get)."""
    fields = {"media_id": item.media_id, "score": item.score, "exploration": item.exploration,
              "propensity": item.propensity, "shard_id": item.shard_id}
    fields.update(overrides)
    return common_pb2.ScoredItem(**fields)


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
        self._filters: TtlLru[str, common_pb2.Filter] = TtlLru(settings.local_cache_entries,
                                                              settings.filter_cache_ttl_seconds)
        # L1 in front of the cache service, under the same (user, context, version) key.
        self._lists: TtlLru[FlightKey, Outcome] | None = (
            TtlLru(settings.list_cache_entries, settings.list_cache_ttl_seconds) if settings.list_cache_entries
            else None)
        self._flights: SingleFlight[FlightKey, Outcome] = SingleFlight()
        self._dimension: int | None = None

    def note_version(self, user_id: str, version: int) -> None:
        """Remember a user's state version (from feedback, state reads or ranking)."""
        known = self._versions.get_stale(user_id)
        if known is None or version >= known:
            self._versions.put(user_id, version)

    def candidate_count(self, k: int) -> int:
        """k': how many candidates each shard returns for a request of k."""
        return min(self._s.shard_max_k, max(self._s.min_candidates, math.ceil(k * self._s.overfetch)))

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
        await run_all(self._lead(leaders), *followers)
        return [p.response(self._s.router_id) for p in plans]

    async def _lead(self, plans: list[Plan]) -> None:
        if not plans:
            return
        try:
            await self._compute(plans)
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
            await self._compute([p])

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
                    user_id=p.user_id, context_hash=p.context_hash, user_version=p.version))
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
                resp = await self._rl.GetUserState(rl_state_service_pb2.GetUserStateRequest(user_id=p.user_id))
            except grpc.aio.AioRpcError as exc:
                p.dependency_failed(exc, "rl_state GetUserState", "rl_state")
                p.state_failed = True
                return
        p.state = resp.state
        p.version = resp.state.version
        self.note_version(p.user_id, p.version)

    async def _constraints(self, p: Plan) -> None:
        with p.stage("constraints"):
            compiled = self._filters.get(p.context_key)
            if compiled is None:
                try:
                    resp = await self._ontology.ResolveConstraints(ontology_service_pb2.ResolveConstraintsRequest(
                        context=p.request.context, preferences=p.request.preferences))
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
        if p.state is None and not p.state_failed:
            jobs.append(self._user_state(p))
        await run_all(*jobs)
        p.query = await self._query_vector(p)

    async def _query_vector(self, p: Plan) -> np.ndarray:
        """The user's vector, blended with the anchor item on a video page; a zero vector when neither
        exists (the shards then return allowed items and the ranking orders them by popularity)."""
        user = None
        if p.state is not None and p.state.vector.dimension:
            user = normalize(decode_vector(p.state.vector, "user_state.vector"))
            if not user.any():
                user = None
        if user is not None and p.anchor is not None:
            return normalize(user + p.anchor)
        if user is not None or p.anchor is not None:
            return user if user is not None else p.anchor  # type: ignore[return-value]
        return np.zeros(await self._catalogue_dimension(), dtype=np.float32)

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

    # -- stages 4-7 --------------------------------------------------------------------------------------

    async def _compute(self, plans: list[Plan]) -> None:
        await run_all(*(self._prepare(p) for p in plans))
        groups: dict[tuple[bytes, int], list[Plan]] = {}
        for p in plans:
            groups.setdefault((p.filter.SerializeToString(deterministic=True), p.request.min_lsn), []).append(p)
        await run_all(*(self._search(group) for group in groups.values()))
        if any(p.no_shard for p in plans):
            if time_remaining() == 0:
                raise DeadlineExceeded("the deadline passed while searching the shards")
            raise Unavailable("no shard could answer; retry later")
        await run_all(*(self._rank(p) for p in plans))
        await run_all(*(self._cache_put(p) for p in plans))

    async def _search(self, plans: list[Plan]) -> None:
        """One Search per shard for every request of the group (they share a filter)."""
        search_filter = common_pb2.Filter()
        search_filter.CopyFrom(plans[0].filter)
        excluded = dict.fromkeys(search_filter.excluded_media_ids)
        for p in plans:
            if p.state is not None:
                excluded.update(dict.fromkeys(p.state.seen_media_ids[: self._s.excluded_seen_max]))
        del search_filter.excluded_media_ids[:]
        search_filter.excluded_media_ids.extend(excluded)
        k_prime = max(self.candidate_count(p.request.k) for p in plans)
        request = shard_service_pb2.SearchRequest(
            queries=encode_batch(np.stack([p.query for p in plans]), "float16"), k=k_prime,
            filter=search_filter, min_lsn=plans[0].request.min_lsn, include_vectors=True, include_attributes=True,
        )

        async def one(shard_id: int) -> shard_service_pb2.SearchResponse | None:
            try:
                return await self._pool.shards[shard_id].call(lambda stub: stub.Search(request))
            except (grpc.aio.AioRpcError, NoReplicaAvailable) as exc:
                log.warning("shard %s skipped: %s", shard_id,
                            exc.code().name if isinstance(exc, grpc.aio.AioRpcError) else exc)
                return None

        start = time.perf_counter()
        shard_ids = list(self._pool.shards)
        answers = dict(zip(shard_ids, await asyncio.gather(*(one(s) for s in shard_ids)), strict=True))
        elapsed = time.perf_counter() - start
        for p in plans:
            p.record("shard_search", elapsed)
            for shard_id, answer in answers.items():
                if answer is None:
                    p.degrade(f"shard-{shard_id}")
            p.no_shard = all(a is None for a in answers.values())
        for i, p in enumerate(plans):
            with p.stage("merge"):
                p.candidates = merge(answers, i, self.candidate_count(p.request.k))

    async def _rank(self, p: Plan) -> None:
        version = p.version or 0
        if not p.candidates:
            p.outcome = Outcome((), "none", version)
            return
        first = p.candidates[0].vector
        request = rl_state_service_pb2.RankRequest(
            user_id=p.user_id, context=p.request.context, k=min(p.request.k, len(p.candidates)),
            candidate_media_ids=[c.media_id for c in p.candidates],
            candidate_vectors=common_pb2.VectorBatch(
                data=b"".join(c.vector.data for c in p.candidates), dtype=first.dtype, dimension=first.dimension,
                count=len(p.candidates)),
            retrieval_scores=[c.score for c in p.candidates],
            popularities=[c.attributes.popularity for c in p.candidates],
        )
        with p.stage("rank"):
            try:
                resp = await self._rl.Rank(request)
            except grpc.aio.AioRpcError as exc:
                log.warning("Rank failed (%s): answering in retrieval order", exc.code().name)
                p.degrade("rl_state")
                top = p.candidates[: p.request.k]
                p.outcome = Outcome(tuple(_lean(c, propensity=1.0) for c in top), "retrieval_order", version)
                return
        if resp.degraded:
            p.degrade("rl_state")
        if resp.user_version:
            self.note_version(p.user_id, resp.user_version)
        shard_of = {c.media_id: c.shard_id for c in p.candidates}
        items = tuple(_lean(i, shard_id=shard_of.get(i.media_id, i.shard_id)) for i in resp.items)
        p.outcome = Outcome(items, resp.policy, version)

    async def _cache_put(self, p: Plan) -> None:
        # A degraded answer is not cached: it would outlive the failure for the whole TTL.
        if p.version is None or p.degraded - {"cache"} or p.outcome is None:
            return
        if self._lists is not None:
            self._lists.put(p.flight_key, p.outcome)
        with p.stage("cache_put"):
            try:
                resp = await self._cache.PutRecommendations(cache_service_pb2.PutRecommendationsRequest(
                    user_id=p.user_id, context_hash=p.context_hash, user_version=p.version,
                    recommendations=cache_service_pb2.RecommendationList(
                        items=p.outcome.items, computed_at_unix_ms=int(time.time() * 1000)),
                    ttl_seconds=self._s.cache_ttl_seconds))
            except grpc.aio.AioRpcError as exc:
                log.warning("cache put failed: %s", exc.code().name)
                p.degrade("cache")
                return
        if resp.bypassed:
            p.degrade("cache")


def merge(answers: dict[int, shard_service_pb2.SearchResponse | None], row: int,
          limit: int) -> list[common_pb2.ScoredItem]:
    """The global top-``limit`` of one query row over every shard's answer, best score first, each id once."""
    pooled: list[common_pb2.ScoredItem] = []
    for shard_id, answer in answers.items():
        if answer is None or row >= len(answer.results):
            continue
        for item in answer.results[row].items:
            if not item.shard_id:
                item.shard_id = shard_id
            pooled.append(item)
    pooled.sort(key=lambda item: item.score, reverse=True)
    seen: set[int] = set()
    merged = []
    for item in pooled:
        if item.media_id not in seen and item.vector.dimension:
            seen.add(item.media_id)
            merged.append(item)
            if len(merged) == limit:
                break
    return merged
