"""The load test's verdicts come from k6's own exit code: a phase whose answers are degraded fails its
thresholds (a degraded answer is a failed check), and a healthy one passes."""

from __future__ import annotations

import asyncio
import subprocess

import pytest
from gmco.common.v1 import common_pb2
from gmco.router.v1 import router_service_pb2 as pb
from gmco.router.v1 import router_service_pb2_grpc
from gmco_common.config import ServerSettings
from gmco_common.server import Registration, start_server
from gmco_router.servicer import answer_trailers
from gmco_stack.envoy import REPO_ROOT

K6 = REPO_ROOT / ".venv" / "bin" / "k6"
SCRIPT = REPO_ROOT / "bench" / "k6" / "recommend.js"


class Router(router_service_pb2_grpc.RecommendationServiceServicer):
    def __init__(self, degraded: bool, trailers: bool = True) -> None:
        self.degraded = degraded
        self.trailers = trailers

    async def Recommend(self, request, context):
        response = pb.RecommendResponse(items=[common_pb2.ScoredItem(media_id=1, score=1.0)], degraded=self.degraded,
                                        degraded_components=["shard-1"] if self.degraded else [],
                                        user_id=request.user_id)
        if self.trailers:
            context.set_trailing_metadata(answer_trailers(response))  # what the real router sends
        return response


async def _k6_exit_code(degraded: bool, rate: int = 0, decode: bool = False, trailers: bool = True) -> int:
    running = await start_server(ServerSettings(port=0), [Registration(
        router_service_pb2_grpc.add_RecommendationServiceServicer_to_server, Router(degraded, trailers),
        "gmco.router.v1.RecommendationService")])
    try:
        args = [str(K6), "run", "--quiet", "-e", f"TARGET=127.0.0.1:{running.port}", "-e", "DURATION=2s",
                "-e", "VUS=8", "-e", f"RATE={rate}", "-e", "P99_MS=2000", "-e", "MAX_DROPPED=100",
                "-e", f"DECODE={int(decode)}", str(SCRIPT)]
        proc = await asyncio.create_subprocess_exec(*args, cwd=REPO_ROOT, stdout=subprocess.DEVNULL,
                                                    stderr=subprocess.DEVNULL)
        return await asyncio.wait_for(proc.wait(), 60)
    finally:
        await running.server.stop(0)


@pytest.mark.parametrize("decode", [False, True])  # judged by the trailers, and by the decoded body too
@pytest.mark.parametrize("rate", [0, 50])  # closed loop, and a fixed arrival rate
async def test_degraded_answers_fail_the_phase_and_healthy_ones_pass(rate: int, decode: bool) -> None:
    assert await _k6_exit_code(degraded=False, rate=rate, decode=decode) == 0
    assert await _k6_exit_code(degraded=True, rate=rate, decode=decode) == 99  # k6's "thresholds failed"


async def test_an_answer_without_its_trailers_fails_the_phase() -> None:
    """An answer the checks cannot judge counts as failed, never as passed."""
    assert await _k6_exit_code(degraded=False, trailers=False) == 99
