"""Run the cache service: ``python -m gmco_cache`` (``--help`` lists the environment variables)."""

from __future__ import annotations

import sys

from gmco_common import grpc_defaults  # noqa: F401 - sets gRPC core settings before grpc loads
from gmco_common.cli import run_service

from gmco_cache.app import start
from gmco_cache.config import PREFIX, Settings

DESCRIPTION = """
Recommendation caches as a gRPC service, in process (memory) or on Redis (one node or Redis Cluster).
A slow or failed Redis gives fast misses (bypassed), never errors. Warm it with `gmco warm --help`.
"""


def main(argv: list[str] | None = None) -> int:
    return run_service("cache", DESCRIPTION, Settings, PREFIX, start, argv)


if __name__ == "__main__":
    sys.exit(main())
