"""How the cache service starts: settings -> backend -> cache -> servicer -> server."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator

from gmco.cache.v1 import cache_service_pb2_grpc
from gmco_common.server import Registration, RunningServer, start_server

from gmco_cache.backend import Backend
from gmco_cache.cache import Cache, Policy, breaker_for
from gmco_cache.config import Settings
from gmco_cache.servicer import SERVICE_NAME, CacheServicer

log = logging.getLogger("gmco_cache")


@contextlib.asynccontextmanager
async def open_backend(settings: Settings) -> AsyncIterator[Backend]:
    """The backend ``settings.backend`` names, closed on exit."""
    if settings.backend == "memory":
        from gmco_cache.memory import MemoryBackend

        yield MemoryBackend(settings.memory_max_entries, settings.memory_max_bytes)
        return
    from gmco_cache.redis_backend import RedisClusterBackend, RedisNodeBackend

    backend: RedisNodeBackend | RedisClusterBackend
    if settings.backend == "redis":
        backend = RedisNodeBackend.from_url(settings.redis_url, settings.redis_max_connections, settings.redis_password)
    else:
        backend = RedisClusterBackend(settings.startup_nodes, settings.redis_max_connections, settings.redis_password)
    async with backend:
        yield backend


async def start(settings: Settings, stack: contextlib.AsyncExitStack) -> RunningServer:
    """Open the backend on ``stack`` and start the server (used by ``__main__`` and by the tests)."""
    backend = await stack.enter_async_context(open_backend(settings))
    cache = Cache(backend, Policy.from_settings(settings), breaker_for(settings))
    running = await start_server(settings, [Registration(
        cache_service_pb2_grpc.add_CacheServiceServicer_to_server, CacheServicer(cache, settings), SERVICE_NAME)],
        stack=stack)
    running.parts.update(backend=backend, cache=cache)
    log.info("cache ready: backend=%s", backend.name)
    return running
