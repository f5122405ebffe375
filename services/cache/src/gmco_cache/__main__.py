"""Run the cache service: ``python -m gmco_cache`` (``--help`` lists the environment variables)."""

from __future__ import annotations

import asyncio
import logging
import sys

from gmco.cache.v1 import cache_service_pb2_grpc
from gmco_common.config import ConfigError, describe_settings
from gmco_common.logging import configure_logging
from gmco_common.server import Registration, serve_until_signal, start_server

from gmco_cache.backend import open_backend
from gmco_cache.cache import Cache, Policy, breaker_for
from gmco_cache.config import PREFIX, Settings, load
from gmco_cache.servicer import SERVICE_NAME, CacheServicer

log = logging.getLogger("gmco_cache")

USAGE = f"""usage: gmco-cache

Recommendation, user-vector and media-vector caches as a gRPC service, in process (memory) or on Redis
(one node or Redis Cluster). A slow or failed Redis gives fast misses (bypassed), never errors.
Warm it with `python -m gmco_cache.warm --help`. Configured by environment variables:

{describe_settings(Settings, PREFIX)}
"""


async def serve(settings: Settings) -> None:
    async with open_backend(settings) as backend:
        cache = Cache(backend, Policy.from_settings(settings), breaker_for(settings))
        registration = Registration(cache_service_pb2_grpc.add_CacheServiceServicer_to_server,
                                    CacheServicer(cache, settings), SERVICE_NAME)
        running = await start_server(settings, [registration])
        log.info("cache ready: backend=%s", backend.name)
        await serve_until_signal(running, settings.grace_seconds)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if args:
        print(USAGE, file=sys.stdout if args[0] in ("-h", "--help") else sys.stderr)
        return 0 if args[0] in ("-h", "--help") else 2
    try:
        settings = load()
    except ConfigError as exc:
        print(f"gmco-cache: {exc}", file=sys.stderr)
        return 2
    configure_logging("cache", settings.log_level, settings.log_format)
    try:
        asyncio.run(serve(settings))
    except (ConfigError, RuntimeError) as exc:
        log.error("cannot start: %s", exc)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
