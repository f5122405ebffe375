"""How the rl_state service starts: settings -> state store (migrated) -> learner, ranker -> server."""

from __future__ import annotations

import contextlib
import logging
from contextlib import AbstractAsyncContextManager

from gmco.rl_state.v1 import rl_state_service_pb2_grpc
from gmco_common.server import Registration, RunningServer, start_server
from gmco_common.supervisor import Supervisor

from gmco_rl_state.config import Settings
from gmco_rl_state.servicer import SERVICE_NAME, build_servicer, model_config
from gmco_rl_state.store import StateStore

log = logging.getLogger("gmco_rl_state")


def open_store(settings: Settings) -> AbstractAsyncContextManager[StateStore]:
    """The configured store, as an async context manager that migrates on entry and refuses a database
    that holds state of another embedding space (the model fingerprint)."""
    fingerprint = model_config(settings).fingerprint()
    if settings.backend == "postgres":
        from gmco_rl_state.postgres_store import PostgresStore

        assert settings.postgres_dsn is not None
        return PostgresStore(settings.postgres_dsn, fingerprint, settings.pool_min_size,
                             settings.pool_max_size, settings.db_timeout_seconds)
    from gmco_rl_state.sqlite_store import SqliteStore

    return SqliteStore(settings.sqlite_path, fingerprint, settings.sqlite_cache_entries)


async def start(settings: Settings, stack: contextlib.AsyncExitStack) -> RunningServer:
    """Open the store on ``stack`` and start the server (used by ``__main__`` and by the tests)."""
    store = await stack.enter_async_context(open_store(settings))
    servicer = build_servicer(settings, store)
    servicer.rollout.start()  # a bad experiments file fails the start, naming the setting
    supervisor = await stack.enter_async_context(Supervisor())
    supervisor.every("experiments", settings.experiments_poll_seconds, servicer.rollout.tick)
    running = await start_server(settings, [Registration(
        rl_state_service_pb2_grpc.add_RLStateServiceServicer_to_server, servicer, SERVICE_NAME)], stack=stack)
    running.parts.update(store=store, servicer=servicer, rollout=servicer.rollout)
    log.info("rl_state ready: backend=%s policy=%s d=%d", settings.backend, settings.policy, settings.bandit_dim)
    return running
