"""Reliability against a real PostgreSQL 15: kill -9 mid-burst, the database down, then back."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import psycopg
import pytest
from gmco.rl_state.v1 import rl_state_service_pb2 as pb
from gmco_testing.postgres import PostgresServer
from grpc_health.v1 import health_pb2, health_pb2_grpc
from rl_state_testkit import Service, event, fresh_database, make_settings, rank_request, serve, unit_vectors

pytestmark = pytest.mark.integration

VECS = unit_vectors(50, seed=21)


@pytest.fixture(scope="module")
def crash_pg() -> Iterator[PostgresServer]:
    """A PostgreSQL of this module's own: these tests kill and stop it."""
    with PostgresServer() as pg:
        yield pg


async def _eventually(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(what)
        await asyncio.sleep(0.05)


async def _send_until_ok(svc: Service, request: pb.RecordFeedbackRequest, timeout: float = 30.0
                         ) -> pb.RecordFeedbackResponse:
    """What a client does after UNAVAILABLE: retry with backoff until the service is back."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return await svc.stub.RecordFeedback(request, timeout=5)
        except grpc.aio.AioRpcError as err:
            if err.code() != grpc.StatusCode.UNAVAILABLE or time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.1)


def _log_and_state(dsn: str) -> tuple[list[str], dict[str, int], dict[str, int]]:
    with psycopg.connect(dsn) as conn:
        ids = [r[0] for r in conn.execute("SELECT event_id FROM feedback_event")]
        per_user_log = dict(conn.execute("SELECT user_id, count(*) FROM feedback_event GROUP BY user_id").fetchall())
        per_user_state = dict(conn.execute("SELECT user_id, event_count FROM user_state").fetchall())
    return ids, per_user_log, per_user_state


async def test_kill9_mid_burst_keeps_every_acknowledged_event_once(crash_pg: PostgresServer,
                                                                    tmp_path: Path) -> None:
    dsn = fresh_database(crash_pg)
    acked: set[str] = set()
    failed: list[list[pb.FeedbackEvent]] = []
    stop = asyncio.Event()

    async with serve(make_settings("postgres", tmp_path, dsn, db_timeout_seconds=0.5)) as svc:

        async def client(c: int) -> None:
            n = 0
            while not stop.is_set():
                batch = [event(f"k{c}-{n}-{j}", f"user{(c + j) % 6}", 100 * c + j, 1.0, VECS[(n + j) % 50])
                         for j in range(5)]
                n += 1
                try:
                    await svc.stub.RecordFeedback(pb.RecordFeedbackRequest(events=batch), timeout=5)
                except grpc.aio.AioRpcError as err:
                    assert err.code() == grpc.StatusCode.UNAVAILABLE, err.details()
                    failed.append(batch)
                    await asyncio.sleep(0.05)
                else:
                    acked.update(e.event_id for e in batch)

        clients = [asyncio.create_task(client(c)) for c in range(4)]
        try:
            await _eventually(lambda: len(acked) >= 200, 30, "acknowledgements before the crash")
            await asyncio.to_thread(crash_pg.kill9)
            acked_at_kill = len(acked)
            await asyncio.sleep(0.3)  # the burst runs into the dead database
            await asyncio.to_thread(crash_pg.start)
            await _eventually(lambda: len(acked) >= acked_at_kill + 200, 60, "acknowledgements after restart")
        finally:
            stop.set()
            await asyncio.gather(*clients)
        assert failed, "the kill should have interrupted some RPCs"

        ids, per_user_log, per_user_state = await asyncio.to_thread(_log_and_state, dsn)
        assert acked <= set(ids)  # every acknowledged event survived the crash ...
        assert len(ids) == len(set(ids))  # ... once
        assert per_user_state == per_user_log  # and each user's state agrees with its log

        for batch in failed:  # the client retries what was not acknowledged
            await _send_until_ok(svc, pb.RecordFeedbackRequest(events=batch))
        everything = acked | {e.event_id for batch in failed for e in batch}
        ids, per_user_log, per_user_state = await asyncio.to_thread(_log_and_state, dsn)
        assert sorted(ids) == sorted(everything)
        assert per_user_state == per_user_log


async def test_database_down_degrades_rank_and_refuses_feedback(crash_pg: PostgresServer, tmp_path: Path) -> None:
    settings = make_settings("postgres", tmp_path, fresh_database(crash_pg), db_timeout_seconds=0.5)
    ids = list(range(10))
    async with serve(settings) as svc:
        await svc.stub.RecordFeedback(pb.RecordFeedbackRequest(events=[event("before", "zed", 0, 1.0, VECS[0])]))
        assert (await svc.stub.Rank(rank_request("zed", ids, VECS[:10], 3))).policy == "thompson"

        await asyncio.to_thread(crash_pg.stop)
        try:
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await svc.stub.RecordFeedback(pb.RecordFeedbackRequest(events=[event("down", "zed", 1, 1.0)]))
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await svc.stub.GetUserState(pb.GetUserStateRequest(user_id="zed"))
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE
            ranked = await svc.stub.Rank(rank_request("zed", ids, VECS[:10], 3, popularities=[1.0] * 10))
            assert ranked.degraded and ranked.policy == "cold_start" and len(ranked.items) == 3
            async with grpc.aio.insecure_channel(f"127.0.0.1:{svc.running.port}") as channel:
                health = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest())
            assert health.status == health_pb2.HealthCheckResponse.SERVING  # degraded, not dead
        finally:
            await asyncio.to_thread(crash_pg.start)

        resp = await _send_until_ok(svc, pb.RecordFeedbackRequest(events=[event("down", "zed", 1, 1.0)]))
        assert resp.applied_count == 1 and resp.user_versions[0].version == 2
        ranked = await svc.stub.Rank(rank_request("zed", ids, VECS[:10], 3))
        assert not ranked.degraded and ranked.policy == "thompson" and ranked.excluded_seen_count == 2
