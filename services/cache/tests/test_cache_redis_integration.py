"""Integration tests against real Redis: the session's 6-node cluster (3 masters + 3 replicas), a cluster of
their own for the kill -9 test, and one plain node. Nothing is mocked."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import grpc
import pytest
from cache_testkit import Service, make_settings, rec_key, recomputations_under_stampede, recs, serve
from gmco.cache.v1 import cache_service_pb2 as pb
from gmco_testing.redis_cluster import RedisCluster, RedisServer, command_calls
from redis.asyncio import Redis
from redis.asyncio.cluster import ClusterNode
from redis.asyncio.cluster import RedisCluster as ClusterClient
from redis.asyncio.connection import AbstractConnection
from redis.crc import key_slot

pytestmark = pytest.mark.integration

# Generous timeouts: these tests check behaviour on a busy machine, not speed.
PATIENT = {"op_timeout_seconds": 1.0, "lock_wait_seconds": 10.0}


@pytest.fixture
async def cluster_service(fresh_cluster: RedisCluster) -> AsyncIterator[Service]:
    async with serve(make_settings(backend="redis-cluster", redis_nodes=tuple(fresh_cluster.nodes_setting.split(",")),
                                   **PATIENT)) as svc:
        yield svc


@pytest.fixture
async def raw(fresh_cluster: RedisCluster) -> AsyncIterator[ClusterClient]:
    client = ClusterClient(startup_nodes=[ClusterNode(h, p) for h, p in fresh_cluster.startup_nodes])
    yield client
    await client.aclose()


def get(user: str, context: str = "c", version: int = 1, **kw) -> pb.GetRecommendationsRequest:
    return pb.GetRecommendationsRequest(user_id=user, context_hash=context, user_version=version, **kw)


def put(user: str, items: pb.RecommendationList, context: str = "c", version: int = 1,
        ttl: int = 0) -> pb.PutRecommendationsRequest:
    return pb.PutRecommendationsRequest(user_id=user, context_hash=context, user_version=version,
                                        recommendations=items, ttl_seconds=ttl)


async def test_ttl_defaults_expiry_and_protobuf_values(cluster_service: Service, raw: ClusterClient) -> None:
    stub = cluster_service.stub
    assert (await stub.PutRecommendations(put("ttl-user", recs(1, 2)))).stored
    assert (await stub.PutRecommendations(put("ttl-user", recs(3), context="short", ttl=1))).stored
    await stub.BatchPut(pb.BatchPutRequest(entries=[
        pb.CacheEntry(key=pb.CacheKey(keyspace=pb.KEYSPACE_USER_VECTOR, user_id="ttl-user"), value=b"uv"),
        pb.CacheEntry(key=pb.CacheKey(keyspace=pb.KEYSPACE_MEDIA_VECTOR, media_id=77), value=b"mv")]))
    assert await raw.get("rec:v2:{ttl-user}:c:1") == recs(1, 2).SerializeToString()
    assert 295_000 < await raw.pttl("rec:v2:{ttl-user}:c:1") <= 300_000
    assert 3_595_000 < await raw.pttl("emb:user:{ttl-user}") <= 3_600_000
    assert 86_395_000 < await raw.pttl("emb:media:{77}") <= 86_400_000
    assert (await stub.GetRecommendations(get("ttl-user", "short"))).hit
    await asyncio.sleep(1.2)
    assert not (await stub.GetRecommendations(get("ttl-user", "short"))).hit
    assert (await stub.GetRecommendations(get("ttl-user"))).hit


async def test_version_invalidation(cluster_service: Service) -> None:
    stub = cluster_service.stub
    await stub.PutRecommendations(put("v-user", recs(1), version=7))
    assert (await stub.GetRecommendations(get("v-user", version=7))).hit
    bumped = await stub.GetRecommendations(get("v-user", version=8))
    assert not bumped.hit and not bumped.bypassed
    await stub.PutRecommendations(put("v-user", recs(2), version=8))
    answer = await stub.GetRecommendations(get("v-user", version=8))
    assert answer.hit and answer.recommendations.items[0].media_id == 2


async def test_batches_cost_one_round_trip_per_master(cluster_service: Service, fresh_cluster: RedisCluster,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    sends = 0
    original = AbstractConnection.send_packed_command

    async def counting(self, command, check_health=True):
        nonlocal sends
        sends += 1
        return await original(self, command, check_health)

    keys = [rec_key(f"user-{i}") for i in range(300)]
    keys += [pb.CacheKey(keyspace=pb.KEYSPACE_USER_VECTOR, user_id=f"user-{i}") for i in range(0, 300, 3)]
    redis_keys = [f"rec:v2:{{user-{i}}}:ctx:1" for i in range(300)] + \
        [f"emb:user:{{user-{i}}}" for i in range(0, 300, 3)]
    slots = {key_slot(k.encode()) for k in redis_keys}
    masters = {fresh_cluster.master_for_slot(s).port for s in slots}
    assert len(masters) == 3  # the batch crosses slots on every master

    await cluster_service.stub.BatchGet(pb.BatchGetRequest(keys=keys))  # connects to every master first
    fresh_cluster.reset_stats()
    monkeypatch.setattr(AbstractConnection, "send_packed_command", counting)
    stored = await cluster_service.stub.BatchPut(pb.BatchPutRequest(
        entries=[pb.CacheEntry(key=k, value=f"v{i}".encode()) for i, k in enumerate(keys)]))
    assert stored.stored_count == len(keys) and not stored.bypassed
    assert sends == 3  # one pipeline per master, not one call per key
    sends = 0
    got = await cluster_service.stub.BatchGet(pb.BatchGetRequest(keys=keys))
    assert sends == 3
    monkeypatch.undo()
    assert [e.value for e in got.entries] == [f"v{i}".encode() for i in range(len(keys))]
    calls = {port: command_calls(port) for port in masters}
    assert sum(c.get("set", 0) for c in calls.values()) == len(keys)
    assert sum(c.get("mget", 0) for c in calls.values()) == len(slots)  # one MGET per slot
    assert all(c.get("get", 0) == 0 and c.get("mget", 0) > 0 for c in calls.values())


async def test_fill_lock_is_set_nx_in_the_users_slot(cluster_service: Service, raw: ClusterClient) -> None:
    stub = cluster_service.stub
    first = await stub.GetRecommendations(get("lock-user", lock_on_miss=True))
    assert first.lock_acquired and not first.hit
    lock = "lock:rec:v2:{lock-user}:c:1"
    assert await raw.get(lock) == first.lock_token.encode()
    assert 0 < await raw.pttl(lock) <= cluster_service.settings.lock_ttl_ms
    assert key_slot(lock.encode()) == key_slot(b"rec:v2:{lock-user}:c:1")
    await stub.PutRecommendations(put("lock-user", recs(9)))  # the lock is left to expire
    again = await stub.GetRecommendations(get("lock-user", lock_on_miss=True))
    assert again.hit and not again.lock_acquired
    assert (await stub.ReleaseLock(pb.ReleaseLockRequest(user_id="lock-user", context_hash="c", user_version=1,
                                                         lock_token=first.lock_token))).released
    assert await raw.exists(lock) == 0
    assert await recomputations_under_stampede(stub, "stampede-user") == 1


@pytest.mark.parametrize(("request_", "field"), [
    (pb.BatchGetRequest(keys=[rec_key("")]), "keys[0].user_id"),
    (pb.BatchGetRequest(keys=[pb.CacheKey(keyspace=5, user_id="u")]), "keys[0].keyspace"),
    (pb.BatchPutRequest(entries=[pb.CacheEntry(key=rec_key("u"), value=b"x" * 2_000_000)]), "entries[0].value"),
])
async def test_bad_input(cluster_service: Service, request_, field: str) -> None:
    method = cluster_service.stub.BatchGet if isinstance(request_, pb.BatchGetRequest) else cluster_service.stub.BatchPut
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await method(request_)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert err.value.details().startswith(f"{field}:")


async def test_single_node() -> None:
    with RedisServer() as node:
        async with serve(make_settings(backend="redis", redis_url=node.url, **PATIENT)) as svc:
            stub = svc.stub
            await stub.PutRecommendations(put("solo", recs(4)))
            assert (await stub.GetRecommendations(get("solo"))).hit
            assert not (await stub.GetRecommendations(get("solo", version=2))).hit
            keys = [pb.CacheKey(keyspace=pb.KEYSPACE_MEDIA_VECTOR, media_id=m) for m in range(50)]
            await stub.BatchPut(pb.BatchPutRequest(entries=[pb.CacheEntry(key=k, value=b"m") for k in keys[::2]]))
            before = command_calls(node.port).get("mget", 0)
            got = await stub.BatchGet(pb.BatchGetRequest(keys=keys))
            assert [e.found for e in got.entries] == [m % 2 == 0 for m in range(50)]
            assert command_calls(node.port)["mget"] == before + 1  # the whole batch is one MGET
            assert await recomputations_under_stampede(stub, "solo-hot") == 1
            raw = Redis.from_url(node.url)
            assert 295_000 < await raw.pttl("rec:v2:{solo}:c:1") <= 300_000
            await raw.aclose()


async def test_kill9_master_under_load() -> None:
    """Kill -9 a master while 8 clients read and write: no call fails; misses or bypasses while the
    cluster fails over; hits again on the failed master's slots once a replica has taken over."""
    with RedisCluster() as cluster:
        settings = make_settings(backend="redis-cluster", redis_nodes=tuple(cluster.nodes_setting.split(",")),
                                 op_timeout_seconds=0.2, breaker_failures=5, breaker_open_seconds=0.3)
        async with serve(settings) as svc:
            stub = svc.stub
            users = [f"load-{i}" for i in range(120)]
            for user in users:
                await stub.PutRecommendations(put(user, recs(1)))
            victim = cluster.master_for_key("{load-0}")
            doomed = [u for u in users if cluster.master_for_key(f"{{{u}}}") is victim]
            assert doomed
            outcomes = {"hit": 0, "miss": 0, "bypass": 0, "error": 0}
            stop = asyncio.Event()

            async def client(n: int) -> None:
                i = n
                while not stop.is_set():
                    user = users[i % len(users)]
                    i += 7
                    try:
                        answer = await stub.GetRecommendations(get(user), timeout=5)
                        if not answer.hit:
                            await stub.PutRecommendations(put(user, recs(1)), timeout=5)
                    except grpc.aio.AioRpcError:
                        outcomes["error"] += 1
                        continue
                    outcomes["hit" if answer.hit else "bypass" if answer.bypassed else "miss"] += 1

            clients = [asyncio.create_task(client(n)) for n in range(8)]
            await asyncio.sleep(1.0)
            hits_before_kill = outcomes["hit"]
            cluster.kill9(victim)
            await asyncio.to_thread(cluster.wait_failover, victim, 30.0)

            # Once the replica serves the slots, the failed master's users get hits again.
            deadline = time.monotonic() + 30
            while True:
                answers = [await stub.GetRecommendations(get(u)) for u in doomed[:5]]
                if all(a.hit for a in answers):
                    break
                assert time.monotonic() < deadline, f"no hits after failover: {answers}"
                await asyncio.sleep(0.2)
            stop.set()
            await asyncio.gather(*clients)
    assert hits_before_kill > 0
    assert outcomes["error"] == 0
    assert outcomes["bypass"] > 0  # the dead master's keys were answered as bypassed misses
