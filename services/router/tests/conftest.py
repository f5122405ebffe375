"""In-process fake dependencies (shards, cache, ontology, rl_state) as real grpc.aio servers on port 0,
and a router started in front of them. Each fake records what it was asked and can be made to fail."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import grpc
import numpy as np
import pytest
from gmco.cache.v1 import cache_service_pb2, cache_service_pb2_grpc
from gmco.common.v1 import common_pb2
from gmco.ontology.v1 import ontology_service_pb2, ontology_service_pb2_grpc
from gmco.rl_state.v1 import rl_state_service_pb2, rl_state_service_pb2_grpc
from gmco.router.v1 import router_service_pb2_grpc
from gmco.shard.v1 import shard_service_pb2, shard_service_pb2_grpc
from gmco_common.config import ServerSettings
from gmco_common.errors import InvalidArgument, Unavailable
from gmco_common.features import DEFAULT_SEED, feature_version, features
from gmco_common.server import Registration, RunningServer, start_server
from gmco_common.slots import SlotMap
from gmco_common.vectors import decode_batch, encode_batch, encode_vector, normalize
from gmco_router.app import start
from gmco_router.config import Settings

DIM = 8
FEATURE_DIM = 16
GENRES = {"genre:drama": 1, "genre:horror": 2, "genre:comedy": 3}


class Switch:
    """Makes a fake fail with UNAVAILABLE or stall, and counts calls."""

    def __init__(self) -> None:
        self.down = False
        self.delay = 0.0
        self.calls: dict[str, int] = {}
        self.cancelled = 0
        self.remaining: list[float | None] = []

    async def enter(self, method: str, context: grpc.aio.ServicerContext) -> None:
        self.calls[method] = self.calls.get(method, 0) + 1
        self.remaining.append(context.time_remaining())
        if self.down:
            raise Unavailable(f"{method} is switched off")
        if self.delay:
            try:
                await asyncio.sleep(self.delay)
            except asyncio.CancelledError:
                self.cancelled += 1
                raise


@dataclass
class Catalogue:
    """Items spread over shards by the even slot map."""

    vectors: dict[int, np.ndarray]
    genres: dict[int, int]
    popularity: dict[int, float]

    @classmethod
    def make(cls, n: int = 200, seed: int = 1) -> Catalogue:
        rng = np.random.default_rng(seed)
        vecs = normalize(rng.normal(size=(n, DIM))).astype(np.float16)
        return cls({i + 1: vecs[i] for i in range(n)}, {i + 1: 1 + i % 3 for i in range(n)},
                   {i + 1: float(rng.random()) for i in range(n)})

    def of_shard(self, shard_id: int, shard_count: int) -> list[int]:
        slots = SlotMap.even(shard_count)
        return [m for m in self.vectors if slots.shard_of(m) == shard_id]


class FakeShard(shard_service_pb2_grpc.ShardServiceServicer):
    def __init__(self, shard_id: int, catalogue: Catalogue, ids: list[int]) -> None:
        self.shard_id = shard_id
        self.catalogue = catalogue
        self.ids = set(ids)
        self.switch = Switch()
        self.searches: list[shard_service_pb2.SearchRequest] = []
        self.upserted: list[int] = []
        self.deleted: list[int] = []

    def _item(self, media_id: int, score: float, vectors: bool) -> common_pb2.ScoredItem:
        item = common_pb2.ScoredItem(media_id=media_id, score=score, shard_id=self.shard_id,
                                     attributes=common_pb2.MediaAttributes(
                                         genre_ids=[self.catalogue.genres[media_id]], popularity=1.0))
        if vectors:
            item.vector.CopyFrom(encode_vector(self.catalogue.vectors[media_id]))
        return item

    async def Search(self, request, context):
        await self.switch.enter("Search", context)
        self.searches.append(request)
        queries = decode_batch(request.queries, "queries", DIM).astype(np.float32)
        filters = list(request.query_filters) or [request.filter] * len(queries)
        results = []
        for q, f in zip(queries, filters, strict=True):
            allowed = [m for m in sorted(self.ids) if m not in set(f.excluded_media_ids)
                       and self.catalogue.genres[m] not in set(f.blocked_genre_ids)]
            if request.order == shard_service_pb2.SEARCH_ORDER_POPULARITY:
                scored = sorted(((self.catalogue.popularity[m], m) for m in allowed), reverse=True)[: request.k]
            else:
                scored = sorted(((float(self.catalogue.vectors[m].astype(np.float32) @ q), m) for m in allowed),
                                reverse=True)[: request.k]
            if request.columnar:
                ids = np.asarray([m for _, m in scored], "<u8")
                result = shard_service_pb2.QueryResult(
                    media_ids=ids.tobytes(), scores=np.asarray([s for s, _ in scored], "<f4").tobytes(),
                    popularities=np.asarray([self.catalogue.popularity[m] for m in ids], "<f4").tobytes())
            else:
                result = shard_service_pb2.QueryResult(
                    items=[self._item(m, s, request.include_vectors) for s, m in scored])
            if request.include_features:
                vecs = np.stack([self.catalogue.vectors[m] for _, m in scored]) if scored else \
                    np.zeros((0, DIM), np.float16)
                result.features.CopyFrom(encode_batch(features(vecs, FEATURE_DIM, DEFAULT_SEED), "float32"))
            results.append(result)
        return shard_service_pb2.SearchResponse(results=results, shard_id=self.shard_id,
                                                feature_version=feature_version(DIM, FEATURE_DIM, DEFAULT_SEED))

    async def GetMedia(self, request, context):
        await self.switch.enter("GetMedia", context)
        found = [m for m in request.media_ids if m in self.ids]
        return shard_service_pb2.GetMediaResponse(
            items=[common_pb2.MediaItem(media_id=m, vector=encode_vector(self.catalogue.vectors[m])) for m in found],
            missing_media_ids=[m for m in request.media_ids if m not in self.ids])

    async def GetStats(self, request, context):
        await self.switch.enter("GetStats", context)
        return shard_service_pb2.GetStatsResponse(shard_id=self.shard_id, dimension=DIM, item_count=len(self.ids))

    async def Upsert(self, request, context):
        await self.switch.enter("Upsert", context)
        self.upserted.extend(i.media_id for i in request.items)
        return shard_service_pb2.UpsertResponse(upserted_count=len(request.items))

    async def Delete(self, request, context):
        await self.switch.enter("Delete", context)
        self.deleted.extend(request.media_ids)
        return shard_service_pb2.DeleteResponse(deleted_count=len(request.media_ids))


class FakeCache(cache_service_pb2_grpc.CacheServiceServicer):
    def __init__(self) -> None:
        self.switch = Switch()
        self.store: dict[tuple[str, str, int], bytes] = {}
        self.put_delay = 0.0
        self.puts_fail = False
        self.batch_unimplemented = False  # answer PutRecommendationsBatch as an older cache service would
        self.batch_sizes: list[int] = []

    async def GetRecommendations(self, request, context):
        await self.switch.enter("Get", context)
        raw = self.store.get((request.user_id, request.context_hash, request.user_version))
        if raw is None:
            return cache_service_pb2.GetRecommendationsResponse(hit=False)
        return cache_service_pb2.GetRecommendationsResponse(
            hit=True, recommendations=cache_service_pb2.RecommendationList.FromString(raw))

    async def PutRecommendations(self, request, context):
        await self.switch.enter("Put", context)
        if self.puts_fail:
            raise Unavailable("cache writes are switched off")
        if self.put_delay:
            await asyncio.sleep(self.put_delay)
        self.store[(request.user_id, request.context_hash, request.user_version)] = \
            request.recommendations.SerializeToString()
        return cache_service_pb2.PutRecommendationsResponse(stored=True)

    async def PutRecommendationsBatch(self, request, context):
        if self.batch_unimplemented:
            await context.abort(grpc.StatusCode.UNIMPLEMENTED, "Method not implemented!")
        await self.switch.enter("PutBatch", context)
        if self.puts_fail:
            raise Unavailable("cache writes are switched off")
        self.batch_sizes.append(len(request.puts))
        for put in request.puts:
            self.store[(put.user_id, put.context_hash, put.user_version)] = put.recommendations.SerializeToString()
        return cache_service_pb2.PutRecommendationsBatchResponse(stored_count=len(request.puts))


class FakeOntology(ontology_service_pb2_grpc.OntologyServiceServicer):
    def __init__(self) -> None:
        self.switch = Switch()

    async def ResolveConstraints(self, request, context):
        await self.switch.enter("Resolve", context)
        if request.context.region not in ("US", "GB"):
            raise InvalidArgument("context.region", f"unknown region {request.context.region!r}")
        blocked = []
        for name in request.preferences.blocked_genres:
            if name not in GENRES:
                raise InvalidArgument("preferences.blocked_genres", f"unknown genre {name!r}")
            blocked.append(GENRES[name])
        return ontology_service_pb2.ResolveConstraintsResponse(
            filter=common_pb2.Filter(blocked_genre_ids=blocked), context_hash="x", ontology_version=1)


class FakeRLState(rl_state_service_pb2_grpc.RLStateServiceServicer):
    def __init__(self) -> None:
        self.switch = Switch()
        self.versions: dict[str, int] = {}
        self.seen: dict[str, list[int]] = {}
        self.feedback: list[rl_state_service_pb2.FeedbackEvent] = []
        self.ranks: list[rl_state_service_pb2.RankRequest] = []
        self.refused_user = ""  # Rank and RankBatch refuse this user's entries (INVALID_ARGUMENT)
        self.rank_batch_unimplemented = False  # an rl_state from before RankBatch
        self.query = normalize(np.arange(1, DIM + 1, dtype=np.float32))

    async def GetUserState(self, request, context):
        await self.switch.enter("GetUserState", context)
        return rl_state_service_pb2.GetUserStateResponse(state=rl_state_service_pb2.UserState(
            user_id=request.user_id, vector=encode_vector(self.query), version=self.versions.get(request.user_id, 0),
            seen_media_ids=self.seen.get(request.user_id, [])))

    async def RecordFeedback(self, request, context):
        await self.switch.enter("RecordFeedback", context)
        touched = []
        for event in request.events:
            self.feedback.append(event)
            self.versions[event.user_id] = self.versions.get(event.user_id, 0) + 1
            self.seen.setdefault(event.user_id, []).insert(0, event.media_id)
            touched.append(event.user_id)
        return rl_state_service_pb2.RecordFeedbackResponse(
            applied_count=len(request.events),
            user_versions=[rl_state_service_pb2.UserVersion(user_id=u, version=self.versions[u])
                           for u in dict.fromkeys(touched)])

    async def Rank(self, request, context):
        await self.switch.enter("Rank", context)
        return self._rank(request)

    async def RankBatch(self, request, context):
        await self.switch.enter("RankBatch", context)
        if self.rank_batch_unimplemented:
            await context.abort(grpc.StatusCode.UNIMPLEMENTED, "Method not found!")
        return rl_state_service_pb2.RankBatchResponse(responses=[self._rank(r) for r in request.requests])

    def _rank(self, request):
        if self.refused_user and request.user_id == self.refused_user:
            raise InvalidArgument("user_id", "is refused by this test")
        self.ranks.append(request)
        order = sorted(range(len(request.candidate_media_ids)), key=lambda i: -request.retrieval_scores[i])
        return rl_state_service_pb2.RankResponse(
            items=[common_pb2.ScoredItem(media_id=request.candidate_media_ids[i], score=request.retrieval_scores[i],
                                         propensity=1.0) for i in order[: request.k]],
            policy="fake", user_version=self.versions.get(request.user_id, 0))


async def _serve(add, servicer, name: str) -> RunningServer:
    return await start_server(ServerSettings(port=0), [Registration(add, servicer, name)])


@dataclass
class Harness:
    stub: router_service_pb2_grpc.RecommendationServiceStub
    shards: list[list[FakeShard]]  # [shard][replica]
    shard_servers: list[list[RunningServer]]
    cache: FakeCache
    ontology: FakeOntology
    rl: FakeRLState
    catalogue: Catalogue
    settings: Settings
    others: list[RunningServer] = field(default_factory=list)
    dim: int = DIM
    genre_codes: dict[str, int] = field(default_factory=lambda: dict(GENRES))


@contextlib.asynccontextmanager
async def harness(replicas: tuple[int, ...] = (1, 1), **overrides: object) -> AsyncIterator[Harness]:
    catalogue = Catalogue.make()
    shards: list[list[FakeShard]] = []
    servers: list[list[RunningServer]] = []
    for sid, count in enumerate(replicas):
        ids = catalogue.of_shard(sid, len(replicas))
        fakes = [FakeShard(sid, catalogue, ids) for _ in range(count)]
        shards.append(fakes)
        servers.append([await _serve(shard_service_pb2_grpc.add_ShardServiceServicer_to_server, f,
                                     "gmco.shard.v1.ShardService") for f in fakes])
    cache, ontology, rl = FakeCache(), FakeOntology(), FakeRLState()
    others = [
        await _serve(cache_service_pb2_grpc.add_CacheServiceServicer_to_server, cache, "gmco.cache.v1.CacheService"),
        await _serve(ontology_service_pb2_grpc.add_OntologyServiceServicer_to_server, ontology,
                     "gmco.ontology.v1.OntologyService"),
        await _serve(rl_state_service_pb2_grpc.add_RLStateServiceServicer_to_server, rl,
                     "gmco.rl_state.v1.RLStateService"),
    ]
    spec = ",".join(f"{sid}=" + "|".join(f"127.0.0.1:{s.port}" for s in row) for sid, row in enumerate(servers))
    settings = Settings(
        port=0, shards=spec, cache_target=f"127.0.0.1:{others[0].port}",
        ontology_target=f"127.0.0.1:{others[1].port}", rl_state_target=f"127.0.0.1:{others[2].port}",
        instance_id="router-test", health_interval_seconds=0.2, min_candidates=10, call_timeout_seconds=2.0,
    )
    settings = dataclasses.replace(settings, **overrides)
    async with contextlib.AsyncExitStack() as stack:
        router = await start(settings, stack)
        channel = await stack.enter_async_context(grpc.aio.insecure_channel(f"127.0.0.1:{router.port}"))
        try:
            yield Harness(router_service_pb2_grpc.RecommendationServiceStub(channel), shards, servers, cache,
                          ontology, rl, catalogue, settings, others)
        finally:
            await router.server.stop(0)
            for server in [*others, *(s for row in servers for s in row)]:
                await server.server.stop(0)


@pytest.fixture
def make_harness():
    """``async with make_harness(replicas=(2, 1), **settings) as h:`` for tests that need another layout."""
    return harness


@pytest.fixture
async def h() -> AsyncIterator[Harness]:
    async with harness() as built:
        yield built
