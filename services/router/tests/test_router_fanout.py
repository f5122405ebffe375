"""Unit tests of the shard fan-out (gmco_router.fanout): one serialised request for every shard, failover,
hedging with one wait for all shards, skipped shards, and the columnar merge."""

from __future__ import annotations

import asyncio
import time

import grpc
import numpy as np
from gmco.shard.v1 import shard_service_pb2
from gmco_common.channels import ChannelOptions
from gmco_common.context import request_id_var
from gmco_common.vectors import encode_batch
from gmco_router.fanout import FanOut, merge_columns
from gmco_router.replicas import Replica, ReplicaPolicy, ReplicaSet


def _answer(shard_id: int, *items: tuple[int, float], features: int = 2) -> shard_service_pb2.SearchResponse:
    ids = np.asarray([m for m, _ in items], "<u8")
    result = shard_service_pb2.QueryResult(
        media_ids=ids.tobytes(), scores=np.asarray([s for _, s in items], "<f4").tobytes(),
        popularities=np.full(len(items), 0.5, "<f4").tobytes())
    if features:
        feats = np.zeros((len(items), features), "<f4") + ids[:, None].astype("<f4")
        result.features.CopyFrom(encode_batch(feats, "float32"))
    return shard_service_pb2.SearchResponse(results=[result], shard_id=shard_id, feature_version="v1")


class FakeSearch:
    """Stands in for a replica's Search multicallable: records what it was sent, then answers, fails or
    stalls as told."""

    def __init__(self, answer: shard_service_pb2.SearchResponse | None = None, delay: float = 0.0,
                 code: grpc.StatusCode | None = None) -> None:
        self.answer, self.delay, self.code = answer, delay, code
        self.sent: list[tuple[bytes, float | None, tuple]] = []

    async def _run(self) -> shard_service_pb2.SearchResponse:
        await asyncio.sleep(self.delay)
        if self.code is not None:
            raise grpc.aio.AioRpcError(self.code, grpc.aio.Metadata(), grpc.aio.Metadata(), details="fake")
        assert self.answer is not None
        return self.answer

    def __call__(self, payload: bytes, timeout: float | None = None, metadata: tuple = ()):
        self.sent.append((payload, timeout, metadata))
        return self._run()


def _replica(shard_id: int, name: str, fake: FakeSearch, policy: ReplicaPolicy | None = None) -> Replica:
    r = Replica(shard_id, name, grpc.aio.insecure_channel("127.0.0.1:1"), policy or ReplicaPolicy(),
                search_channel=grpc.aio.insecure_channel("127.0.0.1:1"))
    r._search = fake  # type: ignore[assignment]
    return r


def _request() -> shard_service_pb2.SearchRequest:
    return shard_service_pb2.SearchRequest(queries=encode_batch(np.ones((1, 4), np.float32), "float16"), k=5)


async def test_every_shard_gets_the_same_bytes_metadata_and_timeout() -> None:
    fakes = [FakeSearch(_answer(s, (s + 1, 0.5))) for s in range(4)]
    shards = {s: ReplicaSet(s, [_replica(s, f"s{s}", fakes[s])]) for s in range(4)}
    fanout = FanOut(shards, ChannelOptions(default_timeout=2.0, auth_token="tok"))
    token = request_id_var.set("req-1")
    try:
        answers = await fanout.search(fanout.prepare(_request()))
    finally:
        request_id_var.reset(token)
    assert {s: a.shard_id for s, a in answers.items()} == {(0,): 0, (1,): 1, (2,): 2, (3,): 3}
    sent = [f.sent[0] for f in fakes]
    for shard, (payload, _, _) in enumerate(sent):  # the same request, naming the shard it is for
        assert shard_service_pb2.SearchRequest.FromString(payload) == shard_service_pb2.SearchRequest(
            queries=_request().queries, k=5, shard_ids=[shard])
        assert payload.startswith(_request().SerializeToString())
    assert all(timeout == 2.0 for _, timeout, _ in sent)
    metadata = dict(sent[0][2])
    assert metadata["x-request-id"] == "req-1" and metadata["authorization"] == "Bearer tok"
    assert len({s[2] for s in sent}) == 1


async def test_failed_call_fails_over_once_and_dead_shards_are_none() -> None:
    failing = FakeSearch(code=grpc.StatusCode.UNAVAILABLE)
    good = FakeSearch(_answer(0, (1, 0.9)))
    shard0 = ReplicaSet(0, [_replica(0, "bad", failing), _replica(0, "good", good)])
    shard0.replicas[1].in_flight = 5  # the failing one is picked first
    shard1 = ReplicaSet(1, [_replica(1, "down", FakeSearch(_answer(1, (2, 0.1))))])
    shard1.replicas[0].healthy = False
    shard2 = ReplicaSet(2, [_replica(2, "only", FakeSearch(code=grpc.StatusCode.UNAVAILABLE))])
    answers = await FanOut({0: shard0, 1: shard1, 2: shard2}, ChannelOptions()).search(
        FanOut({}, ChannelOptions()).prepare(_request()))
    assert answers[(0,)] is not None and answers[(0,)].shard_id == 0
    assert len(failing.sent) == 1 and len(good.sent) == 1
    assert answers[(1,)] is None and answers[(2,)] is None


async def test_slow_call_is_hedged_to_another_replica() -> None:
    policy = ReplicaPolicy(hedge_min_samples=5, hedge_min_delay=0.01)
    slow = FakeSearch(_answer(0, (1, 0.9)), delay=5.0)
    fast = FakeSearch(_answer(0, (7, 0.8)))
    shard0 = ReplicaSet(0, [_replica(0, "slow", slow, policy), _replica(0, "fast", fast, policy)])
    shard0.replicas[1].in_flight = 1  # the slow one is picked first
    for r in shard0.replicas:
        for _ in range(5):
            r.latencies.add(0.001)
    other = ReplicaSet(1, [_replica(1, "other", FakeSearch(_answer(1, (3, 0.2))), policy)])
    fanout = FanOut({0: shard0, 1: other}, ChannelOptions())
    start = time.perf_counter()
    answers = await fanout.search(fanout.prepare(_request()))
    assert time.perf_counter() - start < 1.0
    assert answers[(0,)] is not None and answers[(0,)].results[0].media_ids == np.asarray([7], "<u8").tobytes()
    assert answers[(1,)] is not None
    assert len(slow.sent) == 1 and len(fast.sent) == 1
    await asyncio.sleep(0)
    assert shard0.replicas[0].in_flight == 0  # the loser was cancelled


def test_merge_columns_joins_shards_and_fills_missing_features() -> None:
    answers = {(0,): _answer(0, (1, 0.9), (2, 0.5)), (1,): _answer(1, (3, 0.7), (1, 0.8), features=0), (2,): None}
    ids, scores, pops, feats, shards, version = merge_columns(answers, 0, 10, feature_dim=2)
    assert ids.tolist() == [1, 3, 2]
    assert shards.tolist() == [0, 1, 0]
    assert feats.tolist() == [[1.0, 1.0], [0.0, 0.0], [2.0, 2.0]]  # shard 1 sent no features: zeros
    assert version == "v1" and scores.dtype == np.float32 and pops.shape == (3,)
    empty = merge_columns({(0,): None}, 0, 10, feature_dim=3)
    assert empty[0].shape == (0,) and empty[3].shape == (0, 3)


async def test_shards_at_the_same_replicas_get_one_call_naming_them_all() -> None:
    """A process serving logical shards 0-2 (listed three times at the same targets) gets one Search for
    all three; shard 3 elsewhere gets its own. A group's results carry each result's shard."""
    grouped = _answer(0, (10, 0.9), (11, 0.8), (12, 0.7))
    grouped.results[0].shard_ids = np.asarray([2, 0, 1], "<u4").tobytes()
    a, b = FakeSearch(grouped), FakeSearch(grouped)
    alone = FakeSearch(_answer(3, (30, 0.85)))
    shards = {s: ReplicaSet(s, [_replica(s, "host-a", a), _replica(s, "host-b", b)]) for s in range(3)}
    shards[3] = ReplicaSet(3, [_replica(3, "host-c", alone)])
    fanout = FanOut(shards, ChannelOptions())
    answers = await fanout.search(fanout.prepare(_request()))
    assert set(answers) == {(0, 1, 2), (3,)}
    calls = a.sent + b.sent
    assert len(calls) == 1 and len(alone.sent) == 1
    assert list(shard_service_pb2.SearchRequest.FromString(calls[0][0]).shard_ids) == [0, 1, 2]
    ids, _, _, _, shard_of, _ = merge_columns(answers, 0, 10, feature_dim=2)
    assert ids.tolist() == [10, 30, 11, 12] and shard_of.tolist() == [2, 3, 0, 1]
    # A replica list that changes regroups: shard 2 moved to host-c joins shard 3's call.
    shards[2].replicas = [_replica(2, "host-c", alone)]
    assert sorted(g.shard_ids for g in fanout.groups()) == [(0, 1), (2, 3)]


def test_group_labels() -> None:
    from gmco_router.fanout import shard_label

    assert shard_label((4,)) == "4" and shard_label((0, 1, 2, 3)) == "0-3" and shard_label((0, 2, 5)) == "0,2,5"
