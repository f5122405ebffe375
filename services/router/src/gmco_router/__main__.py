"""``python -m gmco_router``: the public RecommendationService. ``--help`` lists the settings."""

from __future__ import annotations

import sys

from gmco_common import grpc_defaults  # noqa: F401 - sets gRPC core settings before grpc loads
from gmco_common.cli import run_service

from gmco_router.app import start
from gmco_router.config import PREFIX, Settings


def main(argv: list[str] | None = None) -> int:
    return run_service("router", __doc__, Settings, PREFIX, start, argv)


if __name__ == "__main__":
    sys.exit(main())
