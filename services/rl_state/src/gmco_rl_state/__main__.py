"""Run the rl_state service: ``python -m gmco_rl_state`` (``--help`` lists the environment variables)."""

from __future__ import annotations

import sys

from gmco_common import grpc_defaults  # noqa: F401 - sets gRPC core settings before grpc loads
from gmco_common.cli import run_service

from gmco_rl_state.app import start
from gmco_rl_state.config import PREFIX, Settings

DESCRIPTION = """
Per-user state (preference vector, Thompson-sampling bandit, recently seen items), the idempotent
feedback log and the ranking policy, as a gRPC service.
"""


def main(argv: list[str] | None = None) -> int:
    return run_service("rl-state", DESCRIPTION, Settings, PREFIX, start, argv)


if __name__ == "__main__":
    sys.exit(main())
