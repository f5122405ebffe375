"""The warming command against the real cache service (precomputed file) and a RecommendationService."""

from __future__ import annotations

import json
from pathlib import Path

import grpc
import pytest
from cache_testkit import Service, rec_key
from gmco.cache.v1 import cache_service_pb2 as pb
from gmco.common.v1 import common_pb2
from gmco.router.v1 import router_service_pb2, router_service_pb2_grpc
from gmco_cache.warm import main, parser, run
from gmco_common.cache_key import context_hash

CONTEXTS = {"home": {"surface": "HOMEPAGE", "region": "US", "device": "smart_tv"},
            "video": {"surface": "VIDEO_PAGE", "region": "GB", "device": "smart_tv", "anchor_media_id": 3},
            "search": {"surface": "search_results", "region": "DE", "device": "ios_phone"}}


def _hash(name: str, k: int = 1) -> str:
    ctx = CONTEXTS[name]
    return context_hash(common_pb2.RequestContext(
        surface=common_pb2.Surface.Value("SURFACE_" + ctx["surface"].upper()), region=ctx["region"],
        device=ctx["device"], anchor_media_id=ctx.get("anchor_media_id", 0)), common_pb2.UserPreferences(), k)


def _write(tmp_path: Path) -> tuple[Path, Path]:
    entries = tmp_path / "entries.jsonl"
    with entries.open("w") as out:
        for u in range(10):
            for ctx in CONTEXTS.values():
                out.write(json.dumps({"user_id": f"w{u}", "context": ctx, "user_version": 2,
                                      "items": [{"media_id": u * 10 + 1, "score": 0.5}]}) + "\n")
    users = tmp_path / "users.txt"
    users.write_text("".join(f"w{u}\n" for u in range(0, 10, 2)))
    return entries, users


async def test_warm_from_file_stores_the_listed_users(memory_service: Service, tmp_path: Path) -> None:
    entries, users = _write(tmp_path)
    args = parser().parse_args(["--from-file", str(entries), "--users", str(users),
                                "--cache", f"127.0.0.1:{memory_service.port}"])
    tally = await run(args)
    assert (tally.done, tally.not_stored, tally.failed) == (15, 0, 0)
    keys = [rec_key(f"w{u}", _hash(c), 2) for u in range(10) for c in CONTEXTS]
    got = await memory_service.stub.BatchGet(pb.BatchGetRequest(keys=keys))
    assert [e.found for e in got.entries] == [u % 2 == 0 for u in range(10) for _ in range(3)]
    first = pb.RecommendationList.FromString(got.entries[0].value)
    assert first.items[0].media_id == 1 and first.computed_at_unix_ms > 0


async def test_warm_from_file_keys_a_missing_context_field_by_the_router_defaults(
        memory_service: Service, tmp_path: Path) -> None:
    """No context at all, and k left out: stored under the key of HOMEPAGE/US/smart_tv with k = #items,
    which is what the router computes for a request naming nothing."""
    entries = tmp_path / "entries.jsonl"
    entries.write_text(json.dumps({"user_id": "d1", "items": [{"media_id": 5}]}) + "\n"
                       + json.dumps({"user_id": "d2", "context": {"region": "GB"}, "k": 3,
                                     "preferences": {"blocked_genres": ["horror", "comedy"]},
                                     "items": [{"media_id": 6}]}) + "\n")
    tally = await run(parser().parse_args(["--from-file", str(entries), "--cache",
                                           f"127.0.0.1:{memory_service.port}"]))
    assert tally.done == 2 and tally.ok
    gb = context_hash(common_pb2.RequestContext(surface=common_pb2.SURFACE_HOMEPAGE, region="GB",
                                                device="smart_tv"),
                      common_pb2.UserPreferences(blocked_genres=["comedy", "horror"]), 3)
    got = await memory_service.stub.BatchGet(pb.BatchGetRequest(keys=[
        rec_key("d1", _hash("home"), 0), rec_key("d2", gb, 0), rec_key("d1", _hash("home", 10), 0)]))
    assert [e.found for e in got.entries] == [True, True, False]


@pytest.mark.parametrize(("line", "says"), [
    ({"user_id": "u", "context_hash": "homepage:US:tv:k10", "items": []}, "context_hash"),
    ({"user_id": "u", "context": {"surface": "LOBBY"}, "items": []}, "context.surface"),
    ({"user_id": "u", "context": {"colour": "red"}, "items": []}, "colour"),
    ({"user_id": "u", "items": [{"score": 1}]}, "media_id"),
])
def test_a_bad_entry_is_reported_with_its_line(tmp_path: Path, line: dict, says: str) -> None:
    entries = tmp_path / "entries.jsonl"
    entries.write_text("\n" + json.dumps({"user_id": "ok", "items": [{"media_id": 1}]}) + "\n" + json.dumps(line))
    with pytest.raises(SystemExit) as exit_:
        main(["--from-file", str(entries), "--cache", "127.0.0.1:1", "--timeout", "0.2"])
    assert f"{entries}:3:" in str(exit_.value) and says in str(exit_.value)


class Router(router_service_pb2_grpc.RecommendationServiceServicer):
    def __init__(self) -> None:
        self.calls: list[tuple[str, str, int, str]] = []

    async def Recommend(self, request, context):
        metadata = dict(context.invocation_metadata())
        self.calls.append((request.user_id, request.context.region, request.k, metadata.get("x-user-id")))
        return router_service_pb2.RecommendResponse(user_id=request.user_id)


async def test_warm_through_router_calls_recommend_per_user_and_context(tmp_path: Path) -> None:
    router = Router()
    server = grpc.aio.server()
    router_service_pb2_grpc.add_RecommendationServiceServicer_to_server(router, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        users = tmp_path / "users.txt"
        users.write_text("a\nb\n\nc\n")
        args = parser().parse_args(["--router", f"127.0.0.1:{port}", "--users", str(users), "-k", "7",
                                    "--context", "surface=HOMEPAGE,region=US", "--context", "region=GB,device=tv"])
        tally = await run(args)
    finally:
        await server.stop(0)
    assert tally.done == 6 and tally.ok
    assert sorted(router.calls) == sorted((u, r, 7, u) for u in "abc" for r in ("US", "GB"))


def test_help_and_bad_arguments(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(["--help"])
    assert exit_.value.code == 0
    assert "JSON Lines" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exit_:
        main(["--router", "127.0.0.1:1", "--context", "colour=red", "--users", "-"])
    assert exit_.value.code == 2
