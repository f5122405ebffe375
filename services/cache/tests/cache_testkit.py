"""Helpers for the cache tests: the service through its own ``start`` (port 0) and a plain channel to it."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from gmco.cache.v1 import cache_service_pb2 as pb
from gmco.cache.v1 import cache_service_pb2_grpc
from gmco.common.v1 import common_pb2
from gmco_cache.app import start
from gmco_cache.backend import Backend
from gmco_cache.config import Settings
from gmco_testing.component import component
from prometheus_client import REGISTRY


@dataclass
class Service:
    stub: cache_service_pb2_grpc.CacheServiceStub
    backend: Backend
    settings: Settings
    port: int


def make_settings(**overrides: Any) -> Settings:
    return Settings(port=0, **overrides)


@contextlib.asynccontextmanager
async def serve(settings: Settings) -> AsyncIterator[Service]:
    """The service through its own ``start`` on a free port; a channel without retries, so that every
    error the service returns reaches the test."""
    async with component(start, settings) as svc:
        yield Service(svc.stub(cache_service_pb2_grpc.CacheServiceStub), svc.parts["backend"], settings, svc.port)


def recs(*media_ids: int) -> pb.RecommendationList:
    return pb.RecommendationList(items=[common_pb2.ScoredItem(media_id=m, score=1.0 / (i + 1))
                                        for i, m in enumerate(media_ids)], computed_at_unix_ms=1)


def rec_key(user: str, context: str = "ctx", version: int = 1) -> pb.CacheKey:
    return pb.CacheKey(keyspace=pb.KEYSPACE_RECOMMENDATIONS, user_id=user, context_hash=context,
                       user_version=version)


def counter(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def with_settings(settings: Settings, **changes: Any) -> Settings:
    return dataclasses.replace(settings, **changes)


async def recomputations_under_stampede(stub: cache_service_pb2_grpc.CacheServiceStub, user: str,
                                        callers: int = 20) -> int:
    """``callers`` concurrent requests miss one key with lock_on_miss; the lock holder recomputes (50 ms)
    and puts, the others must end with the value. Returns how many recomputed."""
    request = pb.GetRecommendationsRequest(user_id=user, context_hash="c", user_version=1, lock_on_miss=True)
    computations = 0

    async def caller() -> list[int]:
        nonlocal computations
        answer = await stub.GetRecommendations(request)
        if answer.hit:
            return [i.media_id for i in answer.recommendations.items]
        assert answer.lock_acquired and answer.lock_token and not answer.bypassed, f"neither hit nor lock: {answer}"
        computations += 1
        await asyncio.sleep(0.05)  # the recomputation
        await stub.PutRecommendations(pb.PutRecommendationsRequest(
            user_id=user, context_hash="c", user_version=1, recommendations=recs(42)))
        return [42]

    results = await asyncio.gather(*(caller() for _ in range(callers)))
    assert results == [[42]] * callers, results
    return computations
