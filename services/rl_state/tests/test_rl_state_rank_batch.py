"""RankBatch: several users ranked in one call (the misses a router sent to the shards together), each
exactly as Rank ranks it; a bad entry fails the call, naming its index, before anything is ranked."""

from __future__ import annotations

import dataclasses

import grpc
import numpy as np
import pytest
from gmco.rl_state.v1 import rl_state_service_pb2 as pb
from gmco_common.features import feature_version, features
from gmco_common.ids import MAX_RANK_BATCH
from gmco_common.vectors import encode_batch
from prometheus_client import REGISTRY
from rl_state_testkit import event, homepage, make_settings, rank_request, serve, unit_vectors

USERS = ("ann", "ben", "cat")


def _ranked_so_far() -> float:
    return sum(REGISTRY.get_sample_value("gmco_rl_state_rank_seconds_count", {"policy": p}) or 0.0
               for p in ("greedy", "cold_start"))


@pytest.fixture
async def svc(tmp_path):
    # greedy: the same state and candidates give the same order every time, so two calls can be compared
    async with serve(dataclasses.replace(make_settings("sqlite", tmp_path), policy="greedy")) as service:
        vecs = unit_vectors(12, seed=4)
        for u, user in enumerate(USERS):
            await service.stub.RecordFeedback(pb.RecordFeedbackRequest(events=[
                event(f"{user}{i}", user, 1000 + i, 1.0, vecs[(u * 3 + i) % 12]) for i in range(2)]))
        yield service


def _requests(n: int = 3) -> list[pb.RankRequest]:
    vecs = unit_vectors(30, seed=11)
    return [rank_request(USERS[i % 3], list(range(100, 130)), vecs, 8, context=homepage()) for i in range(n)]


async def test_each_entry_is_ranked_as_rank_ranks_it(svc) -> None:
    requests = _requests()
    one_by_one = [await svc.stub.Rank(r) for r in requests]
    batch = await svc.stub.RankBatch(pb.RankBatchRequest(requests=requests))
    assert len(batch.responses) == len(requests)
    for alone, together in zip(one_by_one, batch.responses, strict=True):
        assert together.policy == alone.policy == "greedy"
        assert [i.media_id for i in together.items] == [i.media_id for i in alone.items]
        assert together.user_version == alone.user_version == 1
        assert together.feature_version == alone.feature_version
    assert REGISTRY.get_sample_value("gmco_rl_state_rank_batch_entries_count") >= 1


async def test_features_in_a_batch_and_a_version_mismatch(svc) -> None:
    s = svc.settings
    vecs = unit_vectors(20, seed=2).astype(np.float16)
    shipped = encode_batch(features(vecs, s.bandit_dim, s.projection_seed), "float32")
    version = feature_version(s.media_dim, s.bandit_dim, s.projection_seed)
    good = pb.RankRequest(user_id="ann", candidate_media_ids=list(range(20)), k=5, candidate_features=shipped,
                          feature_version=version, retrieval_scores=[0.5] * 20)
    resp = await svc.stub.RankBatch(pb.RankBatchRequest(requests=[good, good]))
    assert [len(r.items) for r in resp.responses] == [5, 5]
    stale = pb.RankRequest()
    stale.CopyFrom(good)
    stale.feature_version = "jl-1024x8-s9"
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await svc.stub.RankBatch(pb.RankBatchRequest(requests=[good, stale]))
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "jl-1024x8-s9" in err.value.details() and version in err.value.details()


async def test_a_bad_entry_fails_the_call_naming_its_index_and_nothing_is_ranked(svc) -> None:
    requests = _requests()
    requests[1].k = 31  # more than its 30 candidates
    before = _ranked_so_far()
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await svc.stub.RankBatch(pb.RankBatchRequest(requests=requests))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert err.value.details().startswith("requests[1].k")
    assert _ranked_so_far() == before  # the good entry before it was not ranked (nor shown) either


@pytest.mark.parametrize("n", [0, MAX_RANK_BATCH + 1])
async def test_the_batch_size_is_bounded(svc, n: int) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await svc.stub.RankBatch(pb.RankBatchRequest(requests=_requests(n)))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and err.value.details().startswith("requests")
