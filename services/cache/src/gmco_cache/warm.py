"""Warm the recommendation cache for a list of users: ``python -m gmco_cache.warm --help``.

Two sources:

``--router HOST:PORT``
    Calls ``gmco.router.v1.RecommendationService/Recommend`` for every user and every ``--context``; on a
    miss the router computes the list and stores it in the cache itself (its normal path), so the cache
    ends up holding exactly what the router would serve.

``--from-file FILE --cache HOST:PORT``
    Stores precomputed lists with ``BatchPut``. FILE is JSON Lines, one entry per line::

        {"user_id": "u1", "context_hash": "homepage:US:tv:k10", "user_version": 3,
         "items": [{"media_id": 17, "score": 0.93}, {"media_id": 4, "score": 0.90}],
         "ttl_seconds": 300}

    ``ttl_seconds`` is optional (0 or absent: the cache's default). With ``--users`` only the entries of
    those users are stored; without it, every entry in the file.

``--users FILE`` holds one user id per line (``-`` reads standard input). Progress is shown with tqdm.
Exit status: 0 when every entry was stored or every call answered, 1 otherwise, 2 on bad arguments.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
from gmco.cache.v1 import cache_service_pb2 as pb
from gmco.cache.v1 import cache_service_pb2_grpc
from gmco.common.v1 import common_pb2
from gmco.router.v1 import router_service_pb2, router_service_pb2_grpc
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


def parse_context(text: str) -> common_pb2.RequestContext:
    """``surface=HOMEPAGE,region=US,device=smart_tv,max_rating=US:PG-13`` -> RequestContext."""
    context = common_pb2.RequestContext()
    for part in filter(None, text.split(",")):
        name, sep, value = part.partition("=")
        if not sep:
            raise argparse.ArgumentTypeError(f"--context: {part!r} is not name=value")
        if name == "surface":
            context.surface = common_pb2.Surface.Value(f"SURFACE_{value.upper()}")
        elif name in ("region", "device", "max_rating"):
            setattr(context, name, value)
        else:
            raise argparse.ArgumentTypeError(f"--context: unknown field {name!r} (surface, region, device, max_rating)")
    return context


def read_entries(path: Path, users: set[str] | None) -> Iterator[tuple[pb.CacheEntry, int]]:
    """(entry, ttl_seconds) for each line of a JSONL file, keeping only ``users`` when given."""
    with path.open() as lines:
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                doc = json.loads(line)
                if users is not None and doc["user_id"] not in users:
                    continue
                items = [common_pb2.ScoredItem(media_id=int(i["media_id"]), score=float(i.get("score", 0.0)))
                         for i in doc["items"]]
                value = pb.RecommendationList(items=items, computed_at_unix_ms=int(
                    doc.get("computed_at_unix_ms", time.time() * 1000))).SerializeToString()
                key = pb.CacheKey(keyspace=pb.KEYSPACE_RECOMMENDATIONS, user_id=doc["user_id"],
                                  context_hash=doc["context_hash"], user_version=int(doc.get("user_version", 0)))
                yield pb.CacheEntry(key=key, value=value), int(doc.get("ttl_seconds", 0))
            except (KeyError, TypeError, ValueError) as exc:
                raise SystemExit(f"{path}:{number}: bad entry ({exc!r}); see --help for the format") from None


def _batches(entries: Iterable[tuple[pb.CacheEntry, int]]) -> Iterator[tuple[list[pb.CacheEntry], int]]:
    """Batches of up to BATCH entries sharing one TTL (BatchPut takes one TTL per call)."""
    batch: list[pb.CacheEntry] = []
    ttl = 0
    for entry, entry_ttl in entries:
        if batch and (entry_ttl != ttl or len(batch) == BATCH):
            yield batch, ttl
            batch = []
        batch.append(entry)
        ttl = entry_ttl
    if batch:
        yield batch, ttl


async def warm_from_file(cache: str, path: Path, users: set[str] | None, timeout: float) -> Tally:
    tally = Tally()
    async with make_channel(cache, ChannelOptions(default_timeout=timeout)) as channel:
        stub = cache_service_pb2_grpc.CacheServiceStub(channel)
        with tqdm(desc="warming from file", unit="entry") as bar:
            for batch, ttl in _batches(read_entries(path, users)):
                try:
                    reply = await stub.BatchPut(pb.BatchPutRequest(entries=batch, ttl_seconds=ttl))
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
    async with make_channel(router, ChannelOptions(default_timeout=timeout)) as channel:
        stub = router_service_pb2_grpc.RecommendationServiceStub(channel)
        with tqdm(total=work.qsize(), desc="warming through the router", unit="call") as bar:

            async def worker() -> None:
                while not work.empty():
                    user, context = work.get_nowait()
                    try:
                        await stub.Recommend(router_service_pb2.RecommendRequest(user_id=user, context=context, k=k),
                                             metadata=(("x-user-id", user),))
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
    p.add_argument("--users", metavar="FILE", help="user ids, one per line ('-' = stdin); required with --router")
    p.add_argument("--context", action="append", type=parse_context, metavar="name=value,...",
                   help="with --router: a request context, repeatable (default: surface=HOMEPAGE)")
    p.add_argument("-k", type=int, default=10, help="with --router: list length (default %(default)s)")
    p.add_argument("--concurrency", type=int, default=16, help="with --router: calls in flight (default %(default)s)")
    p.add_argument("--timeout", type=float, default=5.0, help="seconds per call (default %(default)s)")
    return p


async def run(args: argparse.Namespace) -> Tally:
    users = read_users(args.users) if args.users else None
    if args.router:
        if users is None:
            raise SystemExit("--router needs --users FILE (one user id per line)")
        contexts = args.context or [common_pb2.RequestContext(surface=common_pb2.SURFACE_HOMEPAGE)]
        return await warm_through_router(args.router, users, contexts, args.k, args.concurrency, args.timeout)
    return await warm_from_file(args.cache, args.from_file, set(users) if users is not None else None, args.timeout)


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    tally = asyncio.run(run(args))
    print(tally.summary("router calls" if args.router else "entries"))
    return 0 if tally.ok else 1


if __name__ == "__main__":
    sys.exit(main())
