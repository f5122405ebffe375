"""Run the cache service: ``python -m gmco_cache`` (``--help`` lists the environment variables)."""

from __future__ import annotations

import logging
import sys

from gmco.cache.v1 import cache_service_pb2_grpc
from gmco_common.cli import run_service
from gmco_common.server import Registration, serve_until_signal, start_server

from gmco_cache.backend import open_backend
from gmco_cache.cache import Cache, Policy, breaker_for
from gmco_cache.config import PREFIX, Settings
from gmco_cache.servicer import SERVICE_NAME, CacheServicer

log = logging.getLogger("gmco_cache")

DESCRIPTION = """
Recommendation, user-vector and media-vector caches as a gRPC service, in process (memory) or on Redis
(one node or Redis Cluster). A slow or failed Redis gives fast misses (bypassed), never errors.
Warm it with `python -m gmco_cache.warm --help`.
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
    return run_service("cache", DESCRIPTION, Settings, PREFIX, serve, argv)

if __name__ == "__main__":
    sys.exit(main())
