"""The ``gmco.cache.v1.CacheService`` handlers: validate, map to keys, call :class:`~gmco_cache.cache.Cache`."""

from __future__ import annotations

import logging

import grpc
from gmco.cache.v1 import cache_service_pb2 as pb
from google.protobuf.message import DecodeError

from gmco_cache.cache import Cache
from gmco_cache.config import Settings
from gmco_cache.keys import Key, check_batch, check_value, key_from_proto, recommendations_key

log = logging.getLogger(__name__)

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["CacheService"].full_name


class CacheServicer:
    def __init__(self, cache: Cache, settings: Settings) -> None:
        self._cache = cache
        self._max_value_bytes = settings.max_value_bytes
        self._max_batch_keys = settings.max_batch_keys

    async def GetRecommendations(self, request: pb.GetRecommendationsRequest,
                                 context: grpc.aio.ServicerContext) -> pb.GetRecommendationsResponse:
        key = recommendations_key(request.user_id, request.context_hash, request.user_version)
        found = await self._cache.get_recommendations(key, request.lock_on_miss)
        response = pb.GetRecommendationsResponse(bypassed=found.bypassed, lock_acquired=bool(found.lock_token),
                                                 lock_token=found.lock_token)
        if found.value is not None:
            try:
                response.recommendations.ParseFromString(found.value)
                response.hit = True
            except DecodeError:
                log.warning("undecodable cached recommendations under %s; answering a miss", key.keyspace.value)
                response.ClearField("recommendations")
        return response

    async def PutRecommendations(self, request: pb.PutRecommendationsRequest,
                                 context: grpc.aio.ServicerContext) -> pb.PutRecommendationsResponse:
        stored = await self._cache.put([self._recommendations_entry(request)], request.ttl_seconds)
        return pb.PutRecommendationsResponse(stored=stored.count == 1, bypassed=stored.bypassed)

    def _recommendations_entry(self, put: pb.PutRecommendationsRequest, field_prefix: str = "") -> tuple[Key, bytes]:
        """The checked (key, value) of one put; INVALID_ARGUMENT names ``field_prefix`` + the field."""
        key = recommendations_key(put.user_id, put.context_hash, put.user_version, field_prefix)
        value = check_value(put.recommendations.SerializeToString(), f"{field_prefix}recommendations",
                            self._max_value_bytes)
        return key, value

    async def PutRecommendationsBatch(self, request: pb.PutRecommendationsBatchRequest,
                                      context: grpc.aio.ServicerContext) -> pb.PutRecommendationsBatchResponse:
        check_batch(len(request.puts), "puts", self._max_batch_keys)
        by_ttl: dict[int, list[tuple[Key, bytes]]] = {}
        for i, put in enumerate(request.puts):  # every entry is checked before anything is stored
            by_ttl.setdefault(put.ttl_seconds, []).append(self._recommendations_entry(put, f"puts[{i}]."))
        stored, bypassed = 0, False
        for ttl, entries in by_ttl.items():
            result = await self._cache.put(entries, ttl)
            stored += result.count
            bypassed = bypassed or result.bypassed
        return pb.PutRecommendationsBatchResponse(stored_count=stored, bypassed=bypassed)

    async def BatchGet(self, request: pb.BatchGetRequest, context: grpc.aio.ServicerContext) -> pb.BatchGetResponse:
        check_batch(len(request.keys), "keys", self._max_batch_keys)
        keys = [key_from_proto(k, f"keys[{i}]") for i, k in enumerate(request.keys)]
        lookup = await self._cache.get(keys)
        return pb.BatchGetResponse(
            entries=[pb.CacheEntry(key=k, value=v or b"", found=v is not None)
                     for k, v in zip(request.keys, lookup.values, strict=True)],
            bypassed=lookup.bypassed,
        )

    async def BatchPut(self, request: pb.BatchPutRequest, context: grpc.aio.ServicerContext) -> pb.BatchPutResponse:
        check_batch(len(request.entries), "entries", self._max_batch_keys)
        entries = [
            (key_from_proto(e.key, f"entries[{i}].key"),
             check_value(e.value, f"entries[{i}].value", self._max_value_bytes))
            for i, e in enumerate(request.entries)
        ]
        stored = await self._cache.put(entries, request.ttl_seconds)
        return pb.BatchPutResponse(stored_count=stored.count, bypassed=stored.bypassed)

    async def ReleaseLock(self, request: pb.ReleaseLockRequest,
                          context: grpc.aio.ServicerContext) -> pb.ReleaseLockResponse:
        key = recommendations_key(request.user_id, request.context_hash, request.user_version)
        return pb.ReleaseLockResponse(released=await self._cache.release_lock(key, request.lock_token))
