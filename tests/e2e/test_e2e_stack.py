"""End-to-end: the whole suite as subprocesses behind the real Envoy (one stack for the session).

The tests that kill a process come last and bring it back, so the order of this file matters.
"""

from __future__ import annotations

import collections
import json
import subprocess
import time

import grpc
import pytest
from gmco.common.v1 import common_pb2
from gmco.ontology.v1 import ontology_service_pb2, ontology_service_pb2_grpc
from gmco.rl_state.v1 import rl_state_service_pb2
from gmco.router.v1 import router_service_pb2 as pb
from gmco.shard.v1 import shard_service_pb2, shard_service_pb2_grpc
from gmco_common.admission import EDGE_START_HEADER
from gmco_common.slots import SlotMap
from gmco_stack.envoy import REPO_ROOT
from gmco_stack.stack import Stack
from gmco_testing.metrics import metric_sum
from gmco_testing.procs import wait_until

pytestmark = pytest.mark.e2e

K6_BIN = REPO_ROOT / ".venv" / "bin" / "k6"
REGION, DEVICE = "US", "smart_tv"


def ctx(surface: int = common_pb2.SURFACE_HOMEPAGE, region: str = REGION) -> common_pb2.RequestContext:
    return common_pb2.RequestContext(surface=surface, region=region, device=DEVICE)


def recommend(envoy, user: str, k: int = 10, **kw) -> pb.RecommendResponse:
    request = pb.RecommendRequest(user_id=user, context=kw.pop("context", ctx()), k=k, **kw)
    return envoy.Recommend(request, metadata=[("x-user-id", user)], timeout=5)


def media(stack: Stack, ids: list[int]) -> dict[int, common_pb2.MediaItem]:
    """Items with attributes, read straight from the shards that own them."""
    slots = SlotMap.even(stack.config.shards)
    found: dict[int, common_pb2.MediaItem] = {}
    for svc in stack.shard_services:
        sid = int(svc.name.split("-")[1])
        mine = [m for m in ids if slots.shard_of(m) == sid]
        if not mine:
            continue
        with grpc.insecure_channel(svc.target) as ch:
            resp = shard_service_pb2_grpc.ShardServiceStub(ch).GetMedia(
                shard_service_pb2.GetMediaRequest(media_ids=mine), timeout=5)
        found.update({i.media_id: i for i in resp.items})
    return found


def _queue_waits(stack: Stack) -> tuple[float, float]:
    """(count, sum in seconds) of the routers' gmco_admission_queue_wait_seconds, both routers together."""
    return (sum(metric_sum(r.metrics_url, "gmco_admission_queue_wait_seconds_count") for r in stack.routers),
            sum(metric_sum(r.metrics_url, "gmco_admission_queue_wait_seconds_sum") for r in stack.routers))


def test_envoy_stamps_each_call_with_when_it_received_it(stack, envoy) -> None:
    """The routers' queue gate reads Envoy's stamp, never the caller's: calls that claim to have waited
    3 s are answered, and the waits the routers recorded for them are Envoy's, milliseconds (a caller's
    stamp taken would also make a standing queue of a few such calls and have the next ones refused)."""
    for i in range(3):  # calls as Envoy stamps them: the routers learn the usual wait (their offset)
        recommend(envoy, f"unstamped-{i}", k=5)
    count, total = _queue_waits(stack)
    forged = str(int((time.time() - 3.0) * 1e6))
    for i in range(6):
        user = f"stamped-{i}"
        envoy.Recommend(pb.RecommendRequest(user_id=user, context=ctx(), k=5),
                        metadata=[("x-user-id", user), (EDGE_START_HEADER, forged)], timeout=5)
    after_count, after_total = _queue_waits(stack)
    assert after_count - count == 6
    assert after_total - total < 0.5, f"the routers saw waits of {after_total - total:.3f} s in all"


def test_a_user_sticks_to_one_router_and_users_spread(envoy) -> None:
    seen: dict[str, set[str]] = collections.defaultdict(set)
    for i in range(24):
        user = f"sticky-{i}"
        for _ in range(3):
            seen[user].add(recommend(envoy, user).router_id)
    assert all(len(routers) == 1 for routers in seen.values()), seen
    assert len(set().union(*seen.values())) == 2


def test_a_blocked_genre_never_appears(envoy, stack: Stack) -> None:
    user = "genre-fan"
    plain = recommend(envoy, user, k=50, skip_cache=True)
    items = media(stack, [i.media_id for i in plain.items])
    counts = collections.Counter(g for item in items.values() for g in item.attributes.genre_ids)
    assert counts, "the unfiltered answer has no genres to block"
    top_code = counts.most_common(1)[0][0]
    with grpc.insecure_channel(stack.services["ontology"].target) as ch:
        ontology = ontology_service_pb2_grpc.OntologyServiceStub(ch)
        graph = ontology.ExportGraph(ontology_service_pb2.ExportGraphRequest(), timeout=5)
        name = next(n.id for n in graph.nodes if n.kind == ontology_service_pb2.NODE_KIND_GENRE
                    and n.code == top_code)
        prefs = common_pb2.UserPreferences(blocked_genres=[name])
        blocked = set(ontology.ResolveConstraints(ontology_service_pb2.ResolveConstraintsRequest(
            context=ctx(), preferences=prefs), timeout=5).filter.blocked_genre_ids)
    assert top_code in blocked
    for surface in (common_pb2.SURFACE_HOMEPAGE, common_pb2.SURFACE_SEARCH_RESULTS):
        filtered = recommend(envoy, user, k=50, preferences=prefs, context=ctx(surface))
        assert filtered.items and not filtered.degraded
        genres = {g for item in media(stack, [i.media_id for i in filtered.items]).values()
                  for g in item.attributes.genre_ids}
        assert not genres & blocked


def test_feedback_changes_the_next_answer_and_makes_the_cache_stale(envoy) -> None:
    user = "learner"
    first = recommend(envoy, user)
    second = recommend(envoy, user)
    assert second.cache_hit, (first.degraded_components, first.router_id, second.router_id, first.user_version,
                              second.user_version, [t.stage for t in first.timings])
    events = [rl_state_service_pb2.FeedbackEvent(event_id=f"e2e-{user}-{n}", user_id=user, media_id=item.media_id,
                                                 reward=1.0, timestamp_unix_ms=int(time.time() * 1000))
              for n, item in enumerate(first.items[:3])]
    fb = envoy.RecordFeedback(pb.RecordFeedbackRequest(events=events), metadata=[("x-user-id", user)], timeout=5)
    assert fb.applied_count == 3
    (version,) = fb.user_versions
    after = recommend(envoy, user)
    assert not after.cache_hit
    assert after.user_version == version.version > first.user_version
    assert [i.media_id for i in after.items] != [i.media_id for i in first.items]
    assert not {i.media_id for i in first.items[:3]} & {i.media_id for i in after.items}
    # A replayed event is applied once.
    again = envoy.RecordFeedback(pb.RecordFeedbackRequest(events=events[:1]), metadata=[("x-user-id", user)],
                                 timeout=5)
    assert again.duplicate_count == 1 and again.applied_count == 0


@pytest.mark.parametrize(("request_", "metadata", "field"), [
    (pb.RecommendRequest(context=ctx(), k=10), [], "user_id"),
    (pb.RecommendRequest(user_id="bad", context=ctx(), k=0), [("x-user-id", "bad")], "k"),
    (pb.RecommendRequest(user_id="bad", context=common_pb2.RequestContext(surface=42, region=REGION,
                                                                         device=DEVICE), k=10),
     [("x-user-id", "bad")], "context.surface"),
    (pb.RecommendRequest(user_id="bad", context=ctx(region="ZZ-unknown"), k=10), [("x-user-id", "bad")],
     "region"),
])
def test_bad_input_is_invalid_argument_through_envoy(envoy, request_, metadata, field: str) -> None:
    with pytest.raises(grpc.RpcError) as err:
        envoy.Recommend(request_, metadata=metadata, timeout=5)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field in err.value.details()


def test_k6_smoke_passes_its_checks(stack: Stack, tmp_path) -> None:
    summary = tmp_path / "k6-summary.json"
    result = subprocess.run(
        [str(K6_BIN), "run", "--quiet", "--summary-export", str(summary),
         "-e", f"TARGET={stack.envoy_target}", "-e", "DURATION=10s", "-e", "VUS=4", "-e", "USERS=2000",
         "-e", "SCENARIO=mixed", "-e", "P99_MS=2000", "-e", f"REGION={REGION}", "-e", f"DEVICE={DEVICE}",
         str(REPO_ROOT / "bench" / "k6" / "recommend.js")],
        check=False, capture_output=True, text=True, timeout=90, cwd=REPO_ROOT)
    # k6 exits non-zero when a threshold fails: checks rate > 99% and the (generous, smoke) p99.
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    checks = json.loads(summary.read_text())["metrics"]["checks"]
    assert checks["passes"] > 100 and checks["fails"] <= 0.01 * checks["passes"]


def test_answers_carry_trailers_that_match_their_body_through_envoy(envoy) -> None:
    for user in ("trailers-1", "trailers-1", "trailers-2"):  # a miss, then a hit, then another user
        request = pb.RecommendRequest(user_id=user, context=ctx(), k=7)
        resp, call = envoy.Recommend.with_call(request, metadata=[("x-user-id", user)], timeout=5)
        got = dict(call.trailing_metadata())
        assert got["gmco-items"] == str(len(resp.items)) == "7"
        assert got["gmco-cache-hit"] == ("1" if resp.cache_hit else "0")
        assert got["gmco-degraded"] == "" and not resp.degraded


def test_a_killed_shard_gives_degraded_answers_naming_it(envoy, stack: Stack) -> None:
    victim = stack.services["shard-1"]
    victim.kill()
    try:
        request = pb.RecommendRequest(user_id="after-shard-loss", context=ctx(), k=10, skip_cache=True)
        resp, call = envoy.Recommend.with_call(request, metadata=[("x-user-id", "after-shard-loss")], timeout=5)
        assert resp.degraded and "shard-1" in resp.degraded_components
        assert resp.items and all(i.shard_id == 0 for i in resp.items)
        assert dict(call.trailing_metadata())["gmco-degraded"] == ",".join(resp.degraded_components)
    finally:
        stack.restart("shard-1")
    # The routers' next health round brings the replica back.
    wait_until(lambda: not recommend(envoy, "after-shard-back", skip_cache=True).degraded, 15,
               "answers no longer degraded after the shard came back")


def test_a_killed_router_is_routed_around(envoy, stack: Stack) -> None:
    users = [f"failover-{i}" for i in range(30)]
    homes = {u: recommend(envoy, u).router_id for u in users}
    victim = stack.services["router-0"]
    victim.kill()
    try:
        for u in users:  # right after the kill: Envoy retries on another router
            assert recommend(envoy, u).items
        for u in users:
            assert recommend(envoy, u).router_id != "router-0"
        assert any(home == "router-0" for home in homes.values())
    finally:
        stack.restart("router-0")
