"""Cache warming against the local stack: what the warmer stores is what the router reads.

Both sources of ``gmco_cache.warm`` are driven at the real stack. Lists from a file are stored under
``gmco_common.cache_key.context_hash`` and must come back from Recommend as cache hits (with the warmed
items, which the router would not have computed itself); warming through the router must leave the list in
the cache service under the same key.
"""

from __future__ import annotations

import json
from pathlib import Path

import grpc
import pytest
from gmco.cache.v1 import cache_service_pb2, cache_service_pb2_grpc
from gmco.common.v1 import common_pb2
from gmco.rl_state.v1 import rl_state_service_pb2, rl_state_service_pb2_grpc
from gmco_cache.warm import parser, run
from gmco_client import RecommendationClient
from gmco_common.cache_key import context_hash, with_defaults
from gmco_stack.stack import Stack
from gmco_testing.procs import wait_until

pytestmark = pytest.mark.e2e


def _version(stack: Stack, user: str) -> int:
    with grpc.insecure_channel(stack.services["rl_state"].target) as ch:
        reply = rl_state_service_pb2_grpc.RLStateServiceStub(ch).GetUserState(
            rl_state_service_pb2.GetUserStateRequest(user_id=user), timeout=5)
    return reply.state.version


async def test_warmed_from_a_file_then_served_as_a_cache_hit(stack: Stack, tmp_path: Path) -> None:
    users = [f"warm-file-{i}" for i in range(3)]
    entries = tmp_path / "entries.jsonl"
    # Ids far outside the catalogue's range: only the warmed list can contain them.
    entries.write_text("".join(json.dumps({
        "user_id": u, "context": {"region": "GB"}, "preferences": {"blocked_genres": ["horror"]}, "k": 3,
        "items": [{"media_id": 900_000_000 + 10 * i + j, "score": 1.0 - j / 10} for j in range(3)]}) + "\n"
        for i, u in enumerate(users)))
    tally = await run(parser().parse_args(["--from-file", str(entries), "--cache", stack.services["cache"].target,
                                           "--rl-state", stack.services["rl_state"].target]))
    assert tally.done == 3 and tally.ok
    with RecommendationClient(stack.envoy_target, timeout=5) as client:
        # The request names the region only: the router fills in surface and device before keying.
        replies = [client.recommend(user, k=3, context={"region": "GB"}, preferences={"blocked_genres": ["horror"]})
                   for user in users]
    for i, (user, reply) in enumerate(zip(users, replies, strict=True)):
        assert reply.cache_hit, user
        assert [it.media_id for it in reply.items] == [900_000_000 + 10 * i + j for j in range(3)]


async def test_warmed_through_the_router_then_found_in_the_cache_service(stack: Stack,
                                                                        tmp_path: Path) -> None:
    users_file = tmp_path / "users.txt"
    users = [f"warm-router-{i}" for i in range(4)]
    users_file.write_text("\n".join(users) + "\n")
    tally = await run(parser().parse_args(["--router", stack.envoy_target, "--users", str(users_file), "-k", "5"]))
    assert tally.done == 4 and tally.ok
    key = context_hash(with_defaults(common_pb2.RequestContext()), common_pb2.UserPreferences(), 5)
    with grpc.insecure_channel(stack.services["cache"].target) as ch:
        cache = cache_service_pb2_grpc.CacheServiceStub(ch)
        for user in users:
            request = cache_service_pb2.GetRecommendationsRequest(user_id=user, context_hash=key,
                                                                  user_version=_version(stack, user))
            # The router writes the list to the cache service just after its reply.
            wait_until(lambda r=request: cache.GetRecommendations(r, timeout=5).hit, 10,
                       f"the warmed list of {user} in the cache service")
            with RecommendationClient(stack.envoy_target, timeout=5) as client:
                again = client.recommend(user, k=5)
            assert again.cache_hit and len(again.items) == 5
