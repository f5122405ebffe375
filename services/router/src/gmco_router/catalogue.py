"""Catalogue reads and writes: GetMedia lookups routed by slot, UpsertMedia and DeleteMedia.

With a durable catalogue log (``GMCO_ROUTER_CATALOG_DSN``), a write is validated, appended to the log
in one transaction (idempotent by ``request_id``) and acknowledged only after it committed; the reply
carries its ``lsn``, and shard replicas apply it by tailing the log (docs/resharding.md). A log that
does not take the write within ``log_timeout`` seconds (down, restarting) answers UNAVAILABLE at once
rather than holding the caller until its deadline; the retry with the same ``request_id`` is safe.

Without a log, a write is applied directly to every replica of the shard that owns each item's slot,
and acknowledged only when all of them applied it. A write that fails on any replica answers
UNAVAILABLE; retrying it is safe (an upsert replaces, a delete of a deleted id is a no-op). The
reply's ``lsn`` is then 0.
"""

from __future__ import annotations

import asyncio
import logging
from collections import defaultdict
from collections.abc import Awaitable, Callable, Iterable, Sequence
from typing import TypeVar

import grpc
from gmco.common.v1 import common_pb2
from gmco.shard.v1 import shard_service_pb2, shard_service_pb2_grpc
from gmco_catalog.log import CatalogLog, Op, Write
from gmco_common.errors import InvalidArgument, Unavailable, from_rpc_error, is_dependency_failure
from gmco_common.slots import SlotMap
from gmco_common.vectors import as_fp16, decode_vector

from gmco_router.replicas import NoReplicaAvailable, ShardPool

log = logging.getLogger(__name__)

T = TypeVar("T")


class Catalogue:
    def __init__(self, pool: ShardPool, slot_map: SlotMap, log: CatalogLog | None = None,
                 dim: int = 1024, log_timeout: float = 2.0) -> None:
        if slot_map.shard_count != pool.shard_count:
            raise ValueError(f"the slot map has {slot_map.shard_count} shards but {pool.shard_count} are configured")
        self._pool = pool
        self._slots = slot_map
        self._log = log
        self._dim = dim
        self._log_timeout = log_timeout

    def _by_shard(self, media_ids: Iterable[int]) -> dict[int, list[int]]:
        groups: dict[int, list[int]] = defaultdict(list)
        ids = list(media_ids)
        for media_id, shard in zip(ids, self._slots.shards_of(ids), strict=True):
            groups[int(shard)].append(media_id)
        return groups

    async def get_media(self, media_ids: Iterable[int]) -> dict[int, common_pb2.MediaItem]:
        """Stored items with their vectors, by id. Ids that are missing, or whose shard is down, are absent."""
        groups = self._by_shard(set(media_ids))

        async def fetch(shard: int, ids: list[int]) -> list[common_pb2.MediaItem]:
            req = shard_service_pb2.GetMediaRequest(media_ids=ids, include_vectors=True)
            try:
                resp = await self._pool.shards[shard].call(lambda stub: stub.GetMedia(req))
            except (grpc.aio.AioRpcError, NoReplicaAvailable) as exc:
                log.warning("GetMedia on shard %s failed: %s", shard, _describe(exc))
                return []
            return list(resp.items)

        found = await asyncio.gather(*(fetch(s, ids) for s, ids in groups.items()))
        return {item.media_id: item for items in found for item in items}

    async def upsert(self, items: Sequence[common_pb2.MediaItem], request_id: str = "") -> tuple[int, int]:
        """(items written, lsn)."""
        if not items:
            raise InvalidArgument("items", "the batch is empty")
        seen: set[int] = set()
        for i, item in enumerate(items):
            if item.media_id in seen:
                raise InvalidArgument(f"items[{i}].media_id", f"duplicate id {item.media_id} in one request")
            seen.add(item.media_id)
        if self._log is not None:
            writes = []
            for i, item in enumerate(items):
                field = f"items[{i}].vector"
                vec = as_fp16(decode_vector(item.vector, field, self._dim), field)
                writes.append(Write(Op.UPSERT, item.media_id, vec.tobytes(),
                                    item.attributes.SerializeToString(deterministic=True)))
            return len(items), await self._append(writes, request_id)
        by_id = {item.media_id: item for item in items}
        groups = self._by_shard(by_id)
        await asyncio.gather(*(
            self._on_every_replica(shard, "items", lambda stub, ids=ids: stub.Upsert(
                shard_service_pb2.UpsertRequest(items=[by_id[m] for m in ids])))
            for shard, ids in groups.items()
        ))
        return len(items), 0

    async def delete(self, media_ids: Sequence[int], request_id: str = "") -> tuple[int, int]:
        """(ids deleted — with a log: ids whose delete was logged —, lsn)."""
        if not media_ids:
            raise InvalidArgument("media_ids", "the list is empty")
        if self._log is not None:
            ids = list(dict.fromkeys(media_ids))
            return len(ids), await self._append([Write(Op.DELETE, m) for m in ids], request_id)
        groups = self._by_shard(dict.fromkeys(media_ids))
        answers = await asyncio.gather(*(
            self._on_every_replica(shard, "media_ids", lambda stub, ids=ids: stub.Delete(
                shard_service_pb2.DeleteRequest(media_ids=ids)))
            for shard, ids in groups.items()
        ))
        # Replicas hold the same items, so any replica's count is the shard's count.
        return sum(replies[0].deleted_count for replies in answers), 0

    async def _append(self, writes: list[Write], request_id: str) -> int:
        """Append in one transaction; the lsn of its last entry once committed."""
        assert self._log is not None
        try:
            result = await asyncio.wait_for(self._log.append(writes, request_id or None), self._log_timeout)
        except TimeoutError:
            raise Unavailable(f"the catalogue log did not take the write within {self._log_timeout:g} s; "
                              "retry with the same request_id") from None
        return result.last_lsn

    async def _on_every_replica(
        self, shard: int, field: str, call: Callable[[shard_service_pb2_grpc.ShardServiceStub], Awaitable[T]]
    ) -> list[T]:
        replicas = self._pool.shards[shard].replicas
        if not replicas:
            raise Unavailable(f"shard {shard} has no replicas; retry later")
        results = await asyncio.gather(*(r.invoke(call) for r in replicas), return_exceptions=True)
        for replica, result in zip(replicas, results, strict=True):
            if isinstance(result, grpc.aio.AioRpcError):
                error = from_rpc_error(result, f"shard {shard}", f"{field}: ")
                if not is_dependency_failure(error):
                    raise error
            if isinstance(result, BaseException):
                raise Unavailable(
                    f"shard {shard} replica {replica.target} did not apply the write ({_describe(result)}); "
                    "retry: writes are idempotent")
        return results  # type: ignore[return-value]


def _describe(exc: BaseException) -> str:
    if isinstance(exc, grpc.aio.AioRpcError):
        return f"{exc.code().name}: {exc.details()}"
    return str(exc) or type(exc).__name__
