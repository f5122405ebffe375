"""Read-your-writes: an upsert followed by a Recommend carrying its lsn as min_lsn always sees the
item when it is the best match. The new item copies the vector and attributes of the anchor of a
video-page request (so it ties with the best possible match and passes the same filters)."""

from __future__ import annotations

import numpy as np
import pytest
from gmco.common.v1 import common_pb2
from gmco.router.v1 import router_service_pb2 as rpb
from gmco.shard.v1 import shard_service_pb2 as spb
from gmco_common.slots import SlotMap

pytestmark = pytest.mark.e2e

ROUNDS = 20


def test_upsert_then_recommend_with_min_lsn_sees_the_item(chaos) -> None:
    probe = chaos.router.Recommend(chaos.recommend_request("ryw-probe"), timeout=10)
    assert probe.items, "the stack recommended nothing for the probe user"
    anchor_id = probe.items[0].media_id
    shard = SlotMap.even(chaos.stack.config.shards).shard_of(anchor_id)
    anchor = chaos.shard_stub(chaos.replicas_of(shard)[0]).GetMedia(
        spb.GetMediaRequest(media_ids=[anchor_id], include_vectors=True), timeout=10).items[0]
    vec = np.frombuffer(anchor.vector.data, np.float16)
    context = common_pb2.RequestContext(surface=common_pb2.SURFACE_VIDEO_PAGE, region="US", device="smart_tv",
                                        anchor_media_id=anchor_id)
    for r in range(ROUNDS):
        new_id = 5 * 10**9 + r
        written = chaos.router.UpsertMedia(rpb.UpsertMediaRequest(
            items=[chaos.item(new_id, vec, anchor.attributes)], request_id=f"ryw-{r}"), timeout=10)
        assert written.lsn > 0
        user = f"ryw-user-{r}"
        resp = chaos.router.Recommend(rpb.RecommendRequest(user_id=user, k=10, skip_cache=True, context=context,
                                                           min_lsn=written.lsn),
                                      metadata=[("x-user-id", user)], timeout=10)
        ids = [i.media_id for i in resp.items]
        assert new_id in ids, f"round {r}: item written at lsn {written.lsn} missing from {ids} ({resp.degraded})"
        chaos.router.DeleteMedia(rpb.DeleteMediaRequest(media_ids=[new_id]), timeout=10)
