"""The durable catalogue log through the whole stack: writes acknowledged with an lsn after commit,
replicas that tail the log, read-your-writes with min_lsn, and nothing acknowledged lost to kill -9."""

from __future__ import annotations

import time

import grpc
import numpy as np
import pytest
from gmco.common.v1 import common_pb2
from gmco.router.v1 import router_service_pb2 as rpb
from gmco.shard.v1 import shard_service_pb2 as spb
from gmco.shard.v1 import shard_service_pb2_grpc
from gmco_common.slots import SlotMap
from gmco_common.vectors import encode_batch, encode_vector
from gmco_stack.stack import Stack

pytestmark = pytest.mark.e2e
NEW_ID = 10**12 + 7


def _item(media_id: int, vec: np.ndarray) -> common_pb2.MediaItem:
    return common_pb2.MediaItem(media_id=media_id, vector=encode_vector(vec),
                                attributes=common_pb2.MediaAttributes(genre_ids=[1], region_mask=1, format_mask=1))


def _shard(stack: Stack, media_id: int) -> shard_service_pb2_grpc.ShardServiceStub:
    sid = SlotMap.even(stack.config.shards).shard_of(media_id)
    return shard_service_pb2_grpc.ShardServiceStub(grpc.insecure_channel(stack.services[f"shard-{sid}"].target)), sid


def test_write_is_acknowledged_with_lsn_and_read_with_min_lsn(envoy, stack: Stack) -> None:
    vec = np.random.default_rng(9).standard_normal(stack.config.dim).astype(np.float32)
    vec /= np.linalg.norm(vec)
    up = envoy.UpsertMedia(rpb.UpsertMediaRequest(items=[_item(NEW_ID, vec)], request_id="e2e-upsert-1"), timeout=10)
    assert up.lsn > 0 and up.upserted_count == 1
    again = envoy.UpsertMedia(rpb.UpsertMediaRequest(items=[_item(NEW_ID, vec)], request_id="e2e-upsert-1"),
                              timeout=10)
    assert again.lsn == up.lsn  # a retried request is acknowledged once, with the same position
    shard, _ = _shard(stack, NEW_ID)
    found = shard.Search(spb.SearchRequest(queries=encode_batch(vec[None]), k=1, min_lsn=up.lsn), timeout=10)
    assert found.applied_lsn >= up.lsn and found.results[0].items[0].media_id == NEW_ID

    gone = envoy.DeleteMedia(rpb.DeleteMediaRequest(media_ids=[NEW_ID]), timeout=10)
    assert gone.lsn > up.lsn
    after = shard.Search(spb.SearchRequest(queries=encode_batch(vec[None]), k=5, min_lsn=gone.lsn), timeout=10)
    assert NEW_ID not in [i.media_id for i in after.results[0].items]


def test_bad_writes_are_invalid_argument(envoy, stack: Stack) -> None:
    short = np.ones(stack.config.dim // 2, np.float32)
    with pytest.raises(grpc.RpcError) as err:
        envoy.UpsertMedia(rpb.UpsertMediaRequest(items=[_item(5, short)]), timeout=10)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "items[0].vector" in err.value.details()
    with pytest.raises(grpc.RpcError) as err:
        envoy.UpsertMedia(rpb.UpsertMediaRequest(), timeout=10)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_killed_replica_keeps_every_acknowledged_write(envoy, stack: Stack) -> None:
    rng = np.random.default_rng(21)
    ids = [NEW_ID + 100 + i for i in range(200)]
    vecs = rng.standard_normal((len(ids), stack.config.dim)).astype(np.float32)
    shard, sid = _shard(stack, ids[0])
    victim = stack.services[f"shard-{sid}"]
    acked: dict[int, np.ndarray] = {}
    last_lsn = 0
    for start in range(0, len(ids), 20):
        batch = [_item(m, v) for m, v in zip(ids[start:start + 20], vecs[start:start + 20], strict=True)]
        last_lsn = envoy.UpsertMedia(rpb.UpsertMediaRequest(items=batch), timeout=10).lsn
        acked.update(zip(ids[start:start + 20], vecs[start:start + 20], strict=True))
        if start == 80:
            victim.kill()  # SIGKILL mid-ingest; the log keeps taking writes
    stack.restart(f"shard-{sid}")
    shard, _ = _shard(stack, ids[0])
    shard.Search(spb.SearchRequest(queries=encode_batch(vecs[:1]), k=1, min_lsn=last_lsn), timeout=30)
    mine = [m for m in acked if SlotMap.even(stack.config.shards).shard_of(m) == sid]
    got = shard.GetMedia(spb.GetMediaRequest(media_ids=mine, include_vectors=True), timeout=10)
    assert not got.missing_media_ids and len(got.items) == len(mine)
    for item in got.items:
        stored = np.frombuffer(item.vector.data, np.float16)
        assert np.array_equal(stored, acked[item.media_id].astype(np.float16))
    # Leave the stack whole for the tests after this one: wait until the routers use the replica again.
    request = rpb.RecommendRequest(user_id="after-restart", k=5, skip_cache=True, context=common_pb2.RequestContext(
        surface=common_pb2.SURFACE_HOMEPAGE, region="US", device="smart_tv"))
    deadline = time.monotonic() + 20
    while envoy.Recommend(request, metadata=[("x-user-id", "after-restart")], timeout=5).degraded:
        assert time.monotonic() < deadline, "the restarted replica did not rejoin the routers' rotation"
        time.sleep(0.2)
