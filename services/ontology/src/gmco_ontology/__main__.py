"""gmco-ontology: the media ontology compiled into shard filters. ``--help`` lists settings."""

from __future__ import annotations

import sys

from gmco_common import grpc_defaults  # noqa: F401 - sets gRPC core settings before grpc loads
from gmco_common.cli import run_service
from gmco_common.config import ConfigError

from gmco_ontology import config
from gmco_ontology.app import start
from gmco_ontology.loader import OntologyFileError


def main(argv: list[str] | None = None) -> int:
    return run_service("ontology", __doc__, config.Settings, config.PREFIX, start, argv,
                       startup_errors=(ConfigError, OntologyFileError, RuntimeError))


if __name__ == "__main__":
    sys.exit(main())
