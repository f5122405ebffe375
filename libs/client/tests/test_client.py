"""gmco_client against a real grpc.aio server that fails on cue: retries exactly on UNAVAILABLE, within the
deadline, with x-user-id set."""

from __future__ import annotations

import asyncio
import itertools
import threading
import time
from collections.abc import AsyncIterator, Iterator

import grpc
import pytest
from gmco.common.v1 import common_pb2
from gmco.rl_state.v1 import rl_state_service_pb2
from gmco.router.v1 import router_service_pb2 as pb
from gmco.router.v1 import router_service_pb2_grpc
from gmco_client import AsyncRecommendationClient, RecommendationClient, RetryPolicy, make_context

FAST = RetryPolicy(attempts=4, initial_backoff=0.01, max_backoff=0.02)


class Scripted(router_service_pb2_grpc.RecommendationServiceServicer):
    """Answers each call with the next status of ``script`` (then OK), recording what it saw."""

    def __init__(self) -> None:
        self.script: list[grpc.StatusCode] = []
        self.calls: list[dict] = []
        self.sleep = 0.0

    async def _answer(self, request, context, reply):
        self.calls.append({"metadata": dict(context.invocation_metadata()), "request": request,
                           "time_remaining": context.time_remaining()})
        if self.sleep:
            await asyncio.sleep(self.sleep)
        if self.script:
            await context.abort(self.script.pop(0), "scripted")
        return reply

    async def Recommend(self, request, context):
        return await self._answer(request, context, pb.RecommendResponse(
            user_id=request.user_id, items=[common_pb2.ScoredItem(media_id=7, score=0.5)]))

    async def RecordFeedback(self, request, context):
        return await self._answer(request, context, pb.RecordFeedbackResponse(applied_count=len(request.events)))

    async def UpsertMedia(self, request, context):
        return await self._answer(request, context, pb.UpsertMediaResponse(lsn=9, upserted_count=len(request.items)))


class Server:
    """A real grpc.aio server on port 0, on its own event loop thread (so the sync client can call it)."""

    def __init__(self) -> None:
        self.servicer = Scripted()
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.port = asyncio.run_coroutine_threadsafe(self._start(), self.loop).result(10)

    async def _start(self) -> int:
        self.server = grpc.aio.server()
        router_service_pb2_grpc.add_RecommendationServiceServicer_to_server(self.servicer, self.server)
        port = self.server.add_insecure_port("127.0.0.1:0")
        await self.server.start()
        return port

    def stop(self) -> None:
        asyncio.run_coroutine_threadsafe(self.server.stop(0), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"


@pytest.fixture
def server() -> Iterator[Server]:
    s = Server()
    yield s
    s.stop()


def test_sync_retries_unavailable_then_answers_with_the_user_header(server: Server) -> None:
    server.servicer.script = [grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.UNAVAILABLE]
    with RecommendationClient(server.target, retry=FAST, timeout=5) as client:
        reply = client.recommend("u1", k=3, context={"surface": "HOMEPAGE", "region": "GB"})
    assert [i.media_id for i in reply.items] == [7]
    assert len(server.servicer.calls) == 3
    assert all(c["metadata"]["x-user-id"] == "u1" for c in server.servicer.calls)
    request = server.servicer.calls[-1]["request"]
    assert (request.k, request.context.surface, request.context.region) == (3, common_pb2.SURFACE_HOMEPAGE, "GB")


@pytest.mark.parametrize("code", [grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.RESOURCE_EXHAUSTED,
                                  grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.INTERNAL])
def test_sync_does_not_retry_anything_else(server: Server, code: grpc.StatusCode) -> None:
    server.servicer.script = [code]
    with RecommendationClient(server.target, retry=FAST) as client, pytest.raises(grpc.RpcError) as err:
        client.recommend("u1")
    assert err.value.code() == code and len(server.servicer.calls) == 1


def test_sync_gives_up_after_its_attempts(server: Server) -> None:
    server.servicer.script = [grpc.StatusCode.UNAVAILABLE] * 10
    with RecommendationClient(server.target, retry=FAST, timeout=5) as client, pytest.raises(grpc.RpcError) as err:
        client.recommend("u1")
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE and len(server.servicer.calls) == 4


def test_the_deadline_covers_every_attempt(server: Server) -> None:
    server.servicer.script = [grpc.StatusCode.UNAVAILABLE] * 1000
    slow = RetryPolicy(attempts=50, initial_backoff=0.1, max_backoff=0.1)
    started = time.monotonic()
    with RecommendationClient(server.target, retry=slow, timeout=0.5) as client, pytest.raises(grpc.RpcError):
        client.recommend("u1")
    assert time.monotonic() - started < 1.5
    assert 1 < len(server.servicer.calls) < 50
    remaining = [c["time_remaining"] for c in server.servicer.calls]
    # One deadline, shrinking: a fresh deadline per attempt would start each at 0.5 s again. The server
    # reads it from the grpc-timeout header on receipt (a whole number of units, its own clock), so any
    # reading may sit a little above the true figure: `jitter` allows for that and nothing more.
    jitter = 0.005
    assert remaining[0] <= 0.5 + jitter and remaining[-1] < remaining[0] - 0.1
    assert all(later <= earlier + jitter for earlier, later in itertools.pairwise(remaining))


def test_a_slow_answer_is_deadline_exceeded_and_not_retried(server: Server) -> None:
    server.servicer.sleep = 0.5
    with RecommendationClient(server.target, retry=FAST) as client, pytest.raises(grpc.RpcError) as err:
        client.recommend("u1", timeout=0.1)
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED and len(server.servicer.calls) == 1


def test_writes_carry_an_idempotency_key_kept_across_retries(server: Server) -> None:
    server.servicer.script = [grpc.StatusCode.UNAVAILABLE]
    item = common_pb2.MediaItem(media_id=1)
    with RecommendationClient(server.target, retry=FAST) as client:
        assert client.upsert_media([item]).lsn == 9
        events = [rl_state_service_pb2.FeedbackEvent(event_id="e1", user_id="u9")]
        assert client.record_feedback(events).applied_count == 1
    ids = [c["request"].request_id for c in server.servicer.calls[:2]]
    assert ids[0] and ids[0] == ids[1]
    assert "x-user-id" not in server.servicer.calls[0]["metadata"]
    assert server.servicer.calls[2]["metadata"]["x-user-id"] == "u9"


@pytest.fixture
async def aserver() -> AsyncIterator[tuple[Scripted, str]]:
    servicer = Scripted()
    srv = grpc.aio.server()
    router_service_pb2_grpc.add_RecommendationServiceServicer_to_server(servicer, srv)
    port = srv.add_insecure_port("127.0.0.1:0")
    await srv.start()
    yield servicer, f"127.0.0.1:{port}"
    await srv.stop(0)


async def test_async_retries_unavailable_then_answers(aserver) -> None:
    servicer, target = aserver
    servicer.script = [grpc.StatusCode.UNAVAILABLE]
    async with AsyncRecommendationClient(target, retry=FAST, timeout=5) as client:
        reply = await client.recommend("u2", k=2, preferences={"blocked_genres": ["horror"]})
    assert reply.user_id == "u2" and len(servicer.calls) == 2
    assert servicer.calls[-1]["metadata"]["x-user-id"] == "u2"
    assert list(servicer.calls[-1]["request"].preferences.blocked_genres) == ["horror"]


async def test_async_does_not_retry_invalid_argument(aserver) -> None:
    servicer, target = aserver
    servicer.script = [grpc.StatusCode.INVALID_ARGUMENT]
    async with AsyncRecommendationClient(target, retry=FAST) as client:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await client.recommend("u2")
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and len(servicer.calls) == 1


def test_make_context() -> None:
    assert make_context({"surface": "video_page", "anchor_media_id": 5}) == common_pb2.RequestContext(
        surface=common_pb2.SURFACE_VIDEO_PAGE, anchor_media_id=5)
    base = common_pb2.RequestContext(region="US")
    assert make_context(base, device="smart_tv") == common_pb2.RequestContext(region="US", device="smart_tv")
    assert make_context(base) is base
