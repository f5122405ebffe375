"""Ranking from the shards' bandit features (the miss path ships 32 floats per candidate, not 1024 halves)."""

from __future__ import annotations

import dataclasses

import grpc
import numpy as np
import pytest
from gmco.rl_state.v1 import rl_state_service_pb2 as pb
from gmco_common.features import feature_version, features
from gmco_common.vectors import encode_batch, normalize
from gmco_rl_state.model import Learner
from gmco_rl_state.policy import PolicyConfig, Ranker
from gmco_rl_state.servicer import model_config
from rl_state_testkit import MEDIA_DIM, event, homepage, make_settings, serve, unit_vectors


def _learned_state(learner: Learner, vecs: np.ndarray):
    from gmco_rl_state.model import Event

    events = [Event(f"e{i}", "u", i, 1.0 if i % 2 else -0.5, 0, 1, "US", "tv", 0.5, v) for i, v in enumerate(vecs[:6])]
    return learner.decode(learner.apply(None, "u", events))


@pytest.mark.parametrize("policy", ["thompson", "greedy"])
def test_the_same_ranking_from_shipped_features_and_from_vectors(tmp_path, policy: str) -> None:
    settings = make_settings("sqlite", tmp_path, bandit_dim=16)
    learner = Learner(model_config(settings))
    ranker = Ranker(learner, PolicyConfig(policy, 0.05, 1.0, 64, 0.1))
    vecs = unit_vectors(40, seed=3).astype(np.float16)
    state = _learned_state(learner, vecs.astype(np.float32))
    # what rl_state computes from vectors, and what the shard ships (gmco_common.features) with the
    # preference term as the search's retrieval score (the query is the user's unit preference vector)
    from_vectors = ranker.rank_user(state, normalize(vecs), 10, np.random.default_rng(7))
    shipped = features(vecs, 16, settings.projection_seed)
    retrieval = normalize(vecs) @ state.pref
    from_features = ranker.rank_features(state, shipped, retrieval, 10, np.random.default_rng(7))
    assert from_features.indices.tolist() == from_vectors.indices.tolist()
    assert np.allclose(from_features.propensities, from_vectors.propensities)
    assert learner.feature_version == feature_version(MEDIA_DIM, 16, settings.projection_seed)


async def test_rank_with_features_over_grpc_and_version_mismatch(tmp_path) -> None:
    settings = dataclasses.replace(make_settings("sqlite", tmp_path), policy="greedy")
    vecs = unit_vectors(30, seed=9).astype(np.float16)
    ids = list(range(500, 530))
    async with serve(settings) as svc:
        await svc.stub.RecordFeedback(pb.RecordFeedbackRequest(events=[
            event(f"x{i}", "ula", 900 + i, 1.0, vecs[i].astype(np.float32)) for i in range(3)]))
        state = (await svc.stub.GetUserState(pb.GetUserStateRequest(user_id="ula"))).state
        pref = np.frombuffer(state.vector.data, np.float16).astype(np.float32)
        retrieval = (normalize(vecs) @ normalize(pref)).tolist()
        by_vectors = await svc.stub.Rank(pb.RankRequest(user_id="ula", candidate_media_ids=ids, k=8,
                                                        candidate_vectors=encode_batch(vecs), context=homepage(),
                                                        retrieval_scores=retrieval))
        version = feature_version(settings.media_dim, settings.bandit_dim, settings.projection_seed)
        shipped = features(vecs, settings.bandit_dim, settings.projection_seed)
        by_features = await svc.stub.Rank(pb.RankRequest(
            user_id="ula", candidate_media_ids=ids, k=8, candidate_features=encode_batch(shipped, "float32"),
            feature_version=version, retrieval_scores=retrieval, context=homepage()))
        assert by_features.feature_version == version
        assert [i.media_id for i in by_features.items] == [i.media_id for i in by_vectors.items]
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await svc.stub.Rank(pb.RankRequest(user_id="ula", candidate_media_ids=ids, k=8,
                                               candidate_features=encode_batch(shipped, "float32"),
                                               feature_version="jl-64x16-s1", context=homepage()))
        assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "jl-64x16-s1" in err.value.details() and version in err.value.details()
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await svc.stub.Rank(pb.RankRequest(user_id="ula", candidate_media_ids=ids, k=8,
                                               candidate_features=encode_batch(shipped[:, :8], "float32"),
                                               feature_version=version))
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "candidate_features" in err.value.details()
