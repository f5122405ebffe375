"""gmco_client through Envoy against the local stack: sync and async, x-user-id stickiness, a write read back."""

from __future__ import annotations

import asyncio

import grpc
import numpy as np
import pytest
from gmco.common.v1 import common_pb2
from gmco.rl_state.v1 import rl_state_service_pb2
from gmco_client import AsyncRecommendationClient, RecommendationClient
from gmco_common.vectors import encode_vector
from gmco_stack.stack import Stack

pytestmark = pytest.mark.e2e


def test_sync_client_recommends_sticks_to_a_router_and_reads_its_write(stack: Stack) -> None:
    with RecommendationClient(stack.envoy_target, timeout=5) as client:
        replies = [client.recommend("client-sync", k=5) for _ in range(3)]
        assert all(len(r.items) == 5 and not r.degraded for r in replies)
        assert len({r.router_id for r in replies}) == 1  # x-user-id set by the client: one router per user
        vector = np.random.default_rng(3).standard_normal(stack.config.dim).astype(np.float16)
        item = common_pb2.MediaItem(media_id=8 * 10**11, vector=encode_vector(vector),
                                    attributes=common_pb2.MediaAttributes(genre_ids=[1], region_mask=0xFF,
                                                                          format_mask=0xFF))
        written = client.upsert_media([item])
        assert written.lsn > 0 and written.upserted_count == 1
        after = client.recommend("client-sync", k=5, min_lsn=written.lsn, skip_cache=True)
        assert len(after.items) == 5 and not after.degraded
        feedback = client.record_feedback([rl_state_service_pb2.FeedbackEvent(
            event_id="client-sync-1", user_id="client-sync", media_id=replies[0].items[0].media_id, reward=1.0)])
        assert feedback.applied_count == 1
        with pytest.raises(grpc.RpcError) as err:
            client.recommend("client-sync", k=0)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_async_client_recommends_concurrently(stack: Stack) -> None:
    # Four at a time: while Envoy's adaptive concurrency re-measures the routers' minimum latency it admits
    # 4 requests at once (CONCURRENCY_MIN) and sheds the rest with UNAVAILABLE.
    replies = []
    async with AsyncRecommendationClient(stack.envoy_target, timeout=5) as client:
        for start in range(0, 16, 4):
            replies += await asyncio.gather(*(client.recommend(f"client-async-{i}", k=4, context={"region": "GB"})
                                              for i in range(start, start + 4)))
    assert all(len(r.items) == 4 for r in replies)
    assert {r.user_id for r in replies} == {f"client-async-{i}" for i in range(16)}
