"""Run the rl_state service: ``python -m gmco_rl_state`` (``--help`` lists the environment variables)."""

from __future__ import annotations

import logging
import sys

from gmco.rl_state.v1 import rl_state_service_pb2_grpc
from gmco_common.cli import run_service
from gmco_common.server import Registration, serve_until_signal, start_server

from gmco_rl_state.config import PREFIX, Settings
from gmco_rl_state.servicer import SERVICE_NAME, build_servicer, model_config
from gmco_rl_state.store import open_store

log = logging.getLogger("gmco_rl_state")

DESCRIPTION = """
Per-user state (preference vector, Thompson-sampling bandit, recently seen items), the idempotent
feedback log and the ranking policy, as a gRPC service.
"""


async def serve(settings: Settings) -> None:
    async with open_store(settings, model_config(settings).fingerprint()) as store:
        servicer = build_servicer(settings, store)
        registration = Registration(rl_state_service_pb2_grpc.add_RLStateServiceServicer_to_server, servicer,
                                    SERVICE_NAME)
        running = await start_server(settings, [registration])
        log.info("rl_state ready: backend=%s policy=%s d=%d", settings.backend, settings.policy,
                 settings.bandit_dim)
        await serve_until_signal(running, settings.grace_seconds)


def main(argv: list[str] | None = None) -> int:
    return run_service("rl-state", DESCRIPTION, Settings, PREFIX, serve, argv)

if __name__ == "__main__":
    sys.exit(main())
