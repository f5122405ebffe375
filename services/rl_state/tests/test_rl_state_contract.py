"""The contract every backend passes: a real gRPC server on port 0, once over SQLite, once over PostgreSQL."""

from __future__ import annotations

import asyncio
import dataclasses
import math

import grpc
import numpy as np
import pytest
from gmco.common.v1 import common_pb2
from gmco.rl_state.v1 import rl_state_service_pb2 as pb
from gmco_common.vectors import decode_vector
from gmco_rl_state.config import Settings
from prometheus_client import REGISTRY
from rl_state_testkit import (
    MEDIA_DIM,
    Service,
    event,
    fresh_database,
    homepage,
    rank_request,
    serve,
    unit_vectors,
)


def _metric(name: str, labels: dict[str, str] | None = None) -> float:
    return REGISTRY.get_sample_value(name, labels or {}) or 0.0


async def test_cold_start_default(service: Service) -> None:
    state = (await service.stub.GetUserState(pb.GetUserStateRequest(user_id="nobody"))).state
    assert state.cold_start and state.version == 0 and state.event_count == 0
    assert list(state.seen_media_ids) == []
    vec = decode_vector(state.vector, "vector")
    assert vec.dtype == np.float16 and vec.shape == (MEDIA_DIM,) and not vec.any()


async def test_feedback_updates_state_and_versions(service: Service) -> None:
    vecs = unit_vectors(3)
    resp = await service.stub.RecordFeedback(pb.RecordFeedbackRequest(events=[
        event("e1", "alice", 10, 1.0, vecs[0]),
        event("e2", "alice", 11, 0.0, vecs[1]),
        event("e3", "bob", 12, -1.0, vecs[2]),
    ]))
    assert (resp.applied_count, resp.duplicate_count) == (3, 0)
    assert {v.user_id: v.version for v in resp.user_versions} == {"alice": 1, "bob": 1}
    alice = (await service.stub.GetUserState(pb.GetUserStateRequest(user_id="alice"))).state
    assert not alice.cold_start and alice.version == 1 and alice.event_count == 2
    assert list(alice.seen_media_ids) == [11, 10]  # most recent first
    pref = decode_vector(alice.vector, "vector").astype(np.float32)
    assert float(pref @ vecs[0]) > 0.99  # moved onto the only positively rewarded item
    bob = (await service.stub.GetUserState(pb.GetUserStateRequest(user_id="bob"))).state
    assert not decode_vector(bob.vector, "vector").any()  # a negative reward does not move it

    resp = await service.stub.RecordFeedback(pb.RecordFeedbackRequest(events=[event("e4", "alice", 13, 0.5)]))
    assert resp.user_versions[0].version == 2


async def test_duplicates_are_ignored_exactly_once(service: Service) -> None:
    applied0 = _metric("gmco_rl_state_feedback_events_applied_total")
    dups0 = _metric("gmco_rl_state_feedback_duplicates_ignored_total")
    vec = unit_vectors(1)[0]
    batch = [event("d1", "carol", 1, 1.0, vec), event("d2", "carol", 2, 1.0, vec), event("d1", "carol", 1, 1.0, vec)]
    first = await service.stub.RecordFeedback(pb.RecordFeedbackRequest(events=batch))
    assert (first.applied_count, first.duplicate_count) == (2, 1)
    again = await service.stub.RecordFeedback(pb.RecordFeedbackRequest(events=batch))
    assert (again.applied_count, again.duplicate_count) == (0, 3)
    assert again.user_versions[0].version == first.user_versions[0].version == 1
    state = (await service.stub.GetUserState(pb.GetUserStateRequest(user_id="carol"))).state
    assert state.event_count == 2 and state.version == 1
    assert _metric("gmco_rl_state_feedback_events_applied_total") - applied0 == 2
    assert _metric("gmco_rl_state_feedback_duplicates_ignored_total") - dups0 == 4


async def test_event_without_vector_counts_and_marks_seen(service: Service) -> None:
    resp = await service.stub.RecordFeedback(pb.RecordFeedbackRequest(events=[event("nv", "dan", 42, 1.0)]))
    assert resp.applied_count == 1
    state = (await service.stub.GetUserState(pb.GetUserStateRequest(user_id="dan"))).state
    assert state.event_count == 1 and list(state.seen_media_ids) == [42]
    assert not decode_vector(state.vector, "vector").any()


async def test_large_media_ids_round_trip(service: Service) -> None:
    big = 2**64 - 5
    await service.stub.RecordFeedback(pb.RecordFeedbackRequest(events=[event("big", "erin", big, 0.0)]))
    state = (await service.stub.GetUserState(pb.GetUserStateRequest(user_id="erin"))).state
    assert list(state.seen_media_ids) == [big]


async def test_rank_cold_start_then_learned_policy_excluding_seen(service: Service) -> None:
    vecs = unit_vectors(20, seed=3)
    ids = list(range(100, 120))
    pops = [float(i) for i in range(20)]
    cold = await service.stub.Rank(rank_request("frank", ids, vecs, 5, popularities=pops, context=homepage()))
    assert cold.policy == "cold_start" and not cold.degraded and cold.user_version == 0
    assert len(cold.items) == 5 and len({i.media_id for i in cold.items}) == 5
    assert all(0 < i.propensity <= 1 for i in cold.items)

    await service.stub.RecordFeedback(pb.RecordFeedbackRequest(events=[
        event(f"f{i}", "frank", ids[i], 1.0, vecs[i]) for i in range(3)
    ]))
    warm = await service.stub.Rank(rank_request("frank", ids, vecs, 10, context=homepage()))
    assert warm.policy == "thompson" and warm.user_version == 1 and warm.excluded_seen_count == 3
    returned = [i.media_id for i in warm.items]
    assert len(returned) == 10 and not set(returned) & set(ids[:3])
    assert all(0 < i.propensity <= 1 and math.isfinite(i.score) for i in warm.items)
    assert [i.score for i in warm.items] == sorted((i.score for i in warm.items), reverse=True)


async def test_rank_returns_fewer_when_seen_items_leave_fewer_than_k(service: Service) -> None:
    vecs = unit_vectors(4, seed=5)
    await service.stub.RecordFeedback(pb.RecordFeedbackRequest(events=[
        event(f"g{i}", "gina", i, 0.0, vecs[i]) for i in range(3)
    ]))
    resp = await service.stub.Rank(rank_request("gina", [0, 1, 2, 3], vecs, 3))
    assert [i.media_id for i in resp.items] == [3] and resp.excluded_seen_count == 3


async def test_rank_latency_is_recorded(service: Service) -> None:
    before = _metric("gmco_rl_state_rank_seconds_count", {"policy": "cold_start"})
    await service.stub.Rank(rank_request("hank", [1, 2], unit_vectors(2), 1))
    assert _metric("gmco_rl_state_rank_seconds_count", {"policy": "cold_start"}) == before + 1


async def test_concurrent_batches_for_one_user_serialise(service: Service) -> None:
    vecs = unit_vectors(40, seed=7)

    async def send(i: int) -> pb.RecordFeedbackResponse:
        return await service.stub.RecordFeedback(pb.RecordFeedbackRequest(events=[
            event(f"c{i}-{j}", "ivy", 1000 + 4 * i + j, 1.0, vecs[4 * i + j]) for j in range(4)
        ]))

    responses = await asyncio.gather(*(send(i) for i in range(10)))
    assert sorted(r.user_versions[0].version for r in responses) == list(range(1, 11))
    state = (await service.stub.GetUserState(pb.GetUserStateRequest(user_id="ivy"))).state
    assert state.version == 10 and state.event_count == 40


async def test_event_id_reused_for_two_users_is_applied_once(service: Service) -> None:
    vec = unit_vectors(1)[0]

    async def send(user: str) -> pb.RecordFeedbackResponse:
        return await service.stub.RecordFeedback(pb.RecordFeedbackRequest(events=[event("shared", user, 1, 1.0, vec)]))

    a, b = await asyncio.gather(send("jo"), send("kim"))
    assert a.applied_count + b.applied_count == 1 and a.duplicate_count + b.duplicate_count == 1
    counts = [(await service.stub.GetUserState(pb.GetUserStateRequest(user_id=u))).state.event_count
              for u in ("jo", "kim")]
    assert sorted(counts) == [0, 1]


async def test_replay_twice_concurrently_equals_once(settings: Settings, tmp_path_factory, request) -> None:
    """The whole log sent twice at once leaves the same state as sending it once."""
    rng = np.random.default_rng(11)
    vecs = unit_vectors(200, seed=12)
    log = [event(f"r{n}", f"u{rng.integers(8)}", int(m), float(rng.choice([0.0, 1.0, -1.0])), vecs[m])
           for n, m in enumerate(rng.integers(0, 200, size=240))]
    batches = [log[i:i + 20] for i in range(0, len(log), 20)]
    users = sorted({e.user_id for e in log})

    async def replay(svc: Service) -> None:
        for batch in batches:
            await svc.stub.RecordFeedback(pb.RecordFeedbackRequest(events=batch))

    async def states(svc: Service) -> list[tuple]:
        out = []
        for u in users:
            s = (await svc.stub.GetUserState(pb.GetUserStateRequest(user_id=u))).state
            out.append((s.version, s.event_count, s.vector.data, tuple(s.seen_media_ids), await _row(svc, u)))
        return out

    async with serve(settings) as once:
        await replay(once)
        expected = await states(once)
    other = _second_settings(settings, tmp_path_factory, request)
    async with serve(other) as twice:
        await asyncio.gather(replay(twice), replay(twice))
        assert await states(twice) == expected


async def _row(svc: Service, user: str) -> tuple:
    row = await svc.store.get(user, None)
    assert row is not None
    return (row.version, row.event_count, row.pref, row.bandit_a, row.bandit_b, row.seen)


def _second_settings(settings: Settings, tmp_path_factory, request) -> Settings:
    if settings.backend == "postgres":
        return dataclasses.replace(settings, postgres_dsn=fresh_database(request.getfixturevalue("postgres")))
    return dataclasses.replace(settings, sqlite_path=tmp_path_factory.mktemp("twice") / "rl.sqlite3")


# --- bad input -----------------------------------------------------------------------------------------
def _fb(**kw: object) -> pb.RecordFeedbackRequest:
    return pb.RecordFeedbackRequest(events=[event(**{"event_id": "x", "user": "u", "media_id": 1, **kw})])


BAD_FEEDBACK = {
    "nan reward": (_fb(reward=float("nan")), "events[0].reward"),
    "reward above 1": (_fb(reward=1.5), "events[0].reward"),
    "reward below -1": (_fb(reward=-2.0), "events[0].reward"),
    "missing event_id": (_fb(event_id=""), "events[0].event_id"),
    "missing user_id": (_fb(user=""), "events[0].user_id"),
    "wrong vector dimension": (_fb(vector=np.ones(MEDIA_DIM + 1) / 10), "events[0].media_vector.dimension"),
    "propensity above 1": (_fb(propensity=2.0), "events[0].propensity"),
    "empty batch": (pb.RecordFeedbackRequest(), "events"),
}


@pytest.mark.parametrize("case", list(BAD_FEEDBACK))
async def test_bad_feedback_is_invalid_argument(service: Service, case: str) -> None:
    request, field = BAD_FEEDBACK[case]
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await service.stub.RecordFeedback(request)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert err.value.details().startswith(field)
    state = (await service.stub.GetUserState(pb.GetUserStateRequest(user_id="u"))).state
    assert state.cold_start  # nothing of a rejected batch was applied


async def test_bad_vector_in_a_batch_names_its_event(service: Service) -> None:
    good, bad = unit_vectors(1)[0], np.full(MEDIA_DIM, np.nan)
    request = pb.RecordFeedbackRequest(events=[event("a", "u", 1, 1.0, good), event("b", "u", 2, 1.0, bad)])
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await service.stub.RecordFeedback(request)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert err.value.details().startswith("events[1].media_vector")


_VECS = unit_vectors(3)
BAD_RANK = {
    "k larger than candidates": (rank_request("u", [1, 2, 3], _VECS, 4), "k"),
    "k zero": (rank_request("u", [1, 2, 3], _VECS, 0), "k"),
    "wrong candidate dimension": (rank_request("u", [1, 2, 3], unit_vectors(3, dim=MEDIA_DIM * 2), 1),
                                  "candidate_vectors.dimension"),
    "vector count mismatch": (rank_request("u", [1, 2], _VECS, 1), "candidate_vectors.count"),
    "no candidates": (pb.RankRequest(user_id="u", k=1), "candidate_media_ids"),
    "missing user": (rank_request("", [1, 2, 3], _VECS, 1), "user_id"),
    "nan vector": (rank_request("u", [1], np.full((1, MEDIA_DIM), np.nan), 1), "candidate_vectors"),
    "popularity count": (rank_request("u", [1, 2, 3], _VECS, 1, popularities=[1.0]), "popularities"),
    "fp32 data length": (pb.RankRequest(user_id="u", candidate_media_ids=[1], k=1, candidate_vectors=(
        common_pb2.VectorBatch(data=b"\0" * 8, dtype=common_pb2.D_TYPE_FLOAT32, dimension=MEDIA_DIM, count=1))),
        "candidate_vectors.data"),
}


@pytest.mark.parametrize("case", list(BAD_RANK))
async def test_bad_rank_is_invalid_argument(service: Service, case: str) -> None:
    request, field = BAD_RANK[case]
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await service.stub.Rank(request)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert err.value.details().startswith(field)


async def test_missing_user_id_in_get_user_state(service: Service) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await service.stub.GetUserState(pb.GetUserStateRequest())
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "user_id" in err.value.details()
