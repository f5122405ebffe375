"""gmco-shard: one slice of the catalogue's embeddings and its ANN index. ``--help`` lists settings."""

from __future__ import annotations

import sys

from gmco_common import grpc_defaults  # noqa: F401 - sets gRPC core settings before grpc loads
from gmco_common.cli import run_service

from gmco_shard.app import start
from gmco_shard.config import PREFIX, Settings


def main(argv: list[str] | None = None) -> int:
    return run_service("shard", __doc__, Settings, PREFIX, start, argv)


if __name__ == "__main__":
    sys.exit(main())
