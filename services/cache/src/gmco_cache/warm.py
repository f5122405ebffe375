"""Warm the recommendation cache for a list of users: ``python -m gmco_cache.warm --help``.

Two sources:

``--router HOST:PORT``
    Calls ``gmco.router.v1.RecommendationService/Recommend`` for every user and every ``--context``; on a
    miss the router computes the list and stores it in the cache itself (its normal path), so the cache
    ends up holding exactly what the router would serve.

``--from-file FILE --cache HOST:PORT``
    Stores precomputed lists with ``BatchPut``. FILE is JSON Lines, one entry per line::

        {"user_id": "u1", "context": {"surface": "HOMEPAGE", "region": "US", "device": "smart_tv"},
         "preferences": {"blocked_genres": ["horror"]}, "k": 10, "user_version": 3,
         "items": [{"media_id": 17, "score": 0.93}, {"media_id": 4, "score": 0.90}],
         "ttl_seconds": 300}

    The key is the one the router reads: ``gmco_common.cache_key.context_hash`` of the context (after the
    router's defaults for a missing surface, region or device: ``GMCO_ROUTER_DEFAULT_*``, else HOMEPAGE, US,
    smart_tv), the preferences and k. ``context`` takes the ``RequestContext`` fields (surface, region,
    device, max_rating, anchor_media_id); ``preferences`` and ``ttl_seconds`` are optional (a TTL of 0 or
    none: the cache's default); ``k`` defaults to the number of items. ``user_version`` is the user's
    state version (``RLStateService.GetUserState``): without it the entry is stored under the version
    ``--rl-state HOST:PORT`` reports, or 0 (a user with no feedback yet) when that is not given.
    With ``--users`` only the entries of those users are stored; without it, every entry in the file.

``--users FILE`` holds one user id per line (``-`` reads standard input). Progress is shown with tqdm.
Exit status: 0 when every entry was stored or every call answered, 1 otherwise, 2 on bad arguments.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import sys
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
from gmco.cache.v1 import cache_service_pb2 as pb
from gmco.cache.v1 import cache_service_pb2_grpc
from gmco.common.v1 import common_pb2
from gmco.rl_state.v1 import rl_state_service_pb2, rl_state_service_pb2_grpc
from gmco_client import AsyncRecommendationClient
from gmco_common.cache_key import ContextDefaults, context_hash, with_defaults
from gmco_common.channels import ChannelOptions, make_channel
from tqdm import tqdm

BATCH = 500


@dataclass
class Tally:
    done: int = 0
    not_stored: int = 0
    failed: int = 0

    def summary(self, what: str) -> str:
        return f"{what}: {self.done} done, {self.not_stored} not stored (cache bypassed), {self.failed} failed"

    @property
    def ok(self) -> bool:
        return self.not_stored == 0 and self.failed == 0


def read_users(path: str) -> list[str]:
    lines = sys.stdin if path == "-" else Path(path).read_text().splitlines()
    return [line.strip() for line in lines if line.strip()]


_CONTEXT_FIELDS = ("surface", "region", "device", "max_rating", "anchor_media_id")


def context_from(fields: dict[str, object], where: str) -> common_pb2.RequestContext:
    """A RequestContext from ``{"surface": "HOMEPAGE", "region": "US", ...}``; ValueError names the field."""
    context = common_pb2.RequestContext()
    for name, value in fields.items():
        if name == "surface":
            text = str(value).upper().removeprefix("SURFACE_")
            if f"SURFACE_{text}" not in common_pb2.Surface.keys():  # noqa: SIM118 (an EnumTypeWrapper)
                raise ValueError(f"{where}.surface: unknown value {value!r}")
            context.surface = common_pb2.Surface.Value(f"SURFACE_{text}")
        elif name == "anchor_media_id":
            context.anchor_media_id = int(value)  # type: ignore[call-overload]
        elif name in _CONTEXT_FIELDS:
            setattr(context, name, str(value))
        else:
            raise ValueError(f"{where}: unknown field {name!r} ({', '.join(_CONTEXT_FIELDS)})")
    return context


def parse_context(text: str) -> common_pb2.RequestContext:
    """``surface=HOMEPAGE,region=US,device=smart_tv,max_rating=US:PG-13`` -> RequestContext."""
    fields: dict[str, object] = {}
    for part in filter(None, text.split(",")):
        name, sep, value = part.partition("=")
        if not sep:
            raise argparse.ArgumentTypeError(f"--context: {part!r} is not name=value")
        fields[name] = value
    try:
        return context_from(fields, "--context")
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def router_defaults() -> ContextDefaults:
    """The router's defaults for a context field left out, as the router reads them."""
    base = ContextDefaults()
    return ContextDefaults(*(os.environ.get(f"GMCO_ROUTER_DEFAULT_{name.upper()}") or getattr(base, name)
                             for name in ("surface", "region", "device")))


@dataclass
class FileEntry:
    user_id: str
    context_hash: str
    user_version: int | None
    value: bytes
    ttl_seconds: int


def read_entries(path: Path, users: set[str] | None, defaults: ContextDefaults) -> Iterator[FileEntry]:
    """Each line of a JSONL file as a FileEntry, keeping only ``users`` when given."""
    with path.open() as lines:
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                doc = json.loads(line)
                if "context_hash" in doc:
                    raise ValueError("'context_hash' is no longer read: give context, preferences and k")
                if users is not None and doc["user_id"] not in users:
                    continue
                items = [common_pb2.ScoredItem(media_id=int(i["media_id"]), score=float(i.get("score", 0.0)))
                         for i in doc["items"]]
                context = with_defaults(context_from(doc.get("context") or {}, "context"), defaults)
                prefs = doc.get("preferences") or {}
                preferences = common_pb2.UserPreferences(blocked_genres=prefs.get("blocked_genres", []),
                                                         allowed_genres=prefs.get("allowed_genres", []))
                k = int(doc.get("k", len(items)))
                if k <= 0:
                    raise ValueError("k: must be >= 1")
                value = pb.RecommendationList(items=items, computed_at_unix_ms=int(
                    doc.get("computed_at_unix_ms", time.time() * 1000))).SerializeToString()
                version = doc.get("user_version")
                yield FileEntry(str(doc["user_id"]), context_hash(context, preferences, k),
                                None if version is None else int(version), value, int(doc.get("ttl_seconds", 0)))
            except (KeyError, TypeError, ValueError, AttributeError) as exc:
                raise SystemExit(f"{path}:{number}: bad entry ({exc}); see --help for the format") from None


def _batches(entries: Iterable[FileEntry]) -> Iterator[tuple[list[FileEntry], int]]:
    """Batches of up to BATCH entries sharing one TTL (BatchPut takes one TTL per call)."""
    batch: list[FileEntry] = []
    ttl = 0
    for entry in entries:
        if batch and (entry.ttl_seconds != ttl or len(batch) == BATCH):
            yield batch, ttl
            batch = []
        batch.append(entry)
        ttl = entry.ttl_seconds
    if batch:
        yield batch, ttl


async def _versions(rl_state: rl_state_service_pb2_grpc.RLStateServiceStub | None, users: set[str],
                    known: dict[str, int]) -> None:
    """Fill ``known`` with each user's current state version (0 without an rl_state to ask)."""
    for user in users - known.keys():
        if rl_state is None:
            known[user] = 0
        else:
            reply = await rl_state.GetUserState(rl_state_service_pb2.GetUserStateRequest(user_id=user))
            known[user] = reply.state.version


async def warm_from_file(cache: str, path: Path, users: set[str] | None, timeout: float,
                         rl_state: str | None = None, defaults: ContextDefaults | None = None) -> Tally:
    tally = Tally()
    versions: dict[str, int] = {}
    options = ChannelOptions(default_timeout=timeout)
    async with contextlib.AsyncExitStack() as stack:
        channel = await stack.enter_async_context(make_channel(cache, options))
        stub = cache_service_pb2_grpc.CacheServiceStub(channel)
        rl = None
        if rl_state:
            rl = rl_state_service_pb2_grpc.RLStateServiceStub(
                await stack.enter_async_context(make_channel(rl_state, options)))
        with tqdm(desc="warming from file", unit="entry") as bar:
            for batch, ttl in _batches(read_entries(path, users, defaults or router_defaults())):
                try:
                    await _versions(rl, {e.user_id for e in batch if e.user_version is None}, versions)
                    entries = [pb.CacheEntry(key=pb.CacheKey(
                        keyspace=pb.KEYSPACE_RECOMMENDATIONS, user_id=e.user_id, context_hash=e.context_hash,
                        user_version=versions[e.user_id] if e.user_version is None else e.user_version),
                        value=e.value) for e in batch]
                    reply = await stub.BatchPut(pb.BatchPutRequest(entries=entries, ttl_seconds=ttl))
                    tally.done += reply.stored_count
                    tally.not_stored += len(batch) - reply.stored_count
                except grpc.aio.AioRpcError as exc:
                    tally.failed += len(batch)
                    tqdm.write(f"BatchPut failed: {exc.code().name}: {exc.details()}")
                bar.update(len(batch))
    return tally


async def warm_through_router(router: str, users: list[str], contexts: list[common_pb2.RequestContext],
                              k: int, concurrency: int, timeout: float) -> Tally:
    tally = Tally()
    work: asyncio.Queue[tuple[str, common_pb2.RequestContext]] = asyncio.Queue()
    for user in users:
        for context in contexts:
            work.put_nowait((user, context))
    # gmco_client sets x-user-id (so Envoy keeps each user on its router) and retries UNAVAILABLE only.
    async with AsyncRecommendationClient(router, timeout=timeout) as client:
        with tqdm(total=work.qsize(), desc="warming through the router", unit="call") as bar:

            async def worker() -> None:
                while not work.empty():
                    user, context = work.get_nowait()
                    try:
                        await client.recommend(user, k, context=context)
                        tally.done += 1
                    except grpc.aio.AioRpcError as exc:
                        tally.failed += 1
                        tqdm.write(f"Recommend({user}) failed: {exc.code().name}: {exc.details()}")
                    bar.update(1)

            await asyncio.gather(*(worker() for _ in range(concurrency)))
    return tally


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m gmco_cache.warm", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--router", metavar="HOST:PORT", help="warm through the router's Recommend")
    source.add_argument("--from-file", type=Path, metavar="FILE", help="precomputed entries (JSON Lines)")
    p.add_argument("--cache", metavar="HOST:PORT", default="127.0.0.1:50052",
                   help="the cache service, with --from-file (default %(default)s)")
    p.add_argument("--rl-state", metavar="HOST:PORT", default=None,
                   help="with --from-file: ask this rl_state for the version of an entry without user_version")
    p.add_argument("--users", metavar="FILE", help="user ids, one per line ('-' = stdin); required with --router")
    p.add_argument("--context", action="append", type=parse_context, metavar="name=value,...",
                   help="with --router: a request context, repeatable (default: the router's defaults)")
    p.add_argument("-k", type=int, default=10, help="with --router: list length (default %(default)s)")
    p.add_argument("--concurrency", type=int, default=16, help="with --router: calls in flight (default %(default)s)")
    p.add_argument("--timeout", type=float, default=5.0, help="seconds per call (default %(default)s)")
    return p


async def run(args: argparse.Namespace) -> Tally:
    users = read_users(args.users) if args.users else None
    if args.router:
        if users is None:
            raise SystemExit("--router needs --users FILE (one user id per line)")
        contexts = args.context or [common_pb2.RequestContext()]
        return await warm_through_router(args.router, users, contexts, args.k, args.concurrency, args.timeout)
    return await warm_from_file(args.cache, args.from_file, set(users) if users is not None else None, args.timeout,
                                args.rl_state)


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    tally = asyncio.run(run(args))
    print(tally.summary("router calls" if args.router else "entries"))
    return 0 if tally.ok else 1


if __name__ == "__main__":
    sys.exit(main())
