"""gmco-ontology: the media ontology compiled into shard filters. ``--help`` lists settings."""

from __future__ import annotations

import asyncio
import logging
import sys

from gmco.ontology.v1 import ontology_service_pb2, ontology_service_pb2_grpc
from gmco_common.cli import run_service
from gmco_common.config import ConfigError
from gmco_common.server import Registration, serve_until_signal, start_server

from gmco_ontology import config
from gmco_ontology.backends import EmbeddedBackend, GraphBackend, Neo4jBackend
from gmco_ontology.loader import OntologyFileError
from gmco_ontology.servicer import OntologyServicer

log = logging.getLogger("gmco_ontology")
SERVICE = ontology_service_pb2.DESCRIPTOR.services_by_name["OntologyService"].full_name


def backend_for(settings: config.Settings) -> GraphBackend:
    if settings.backend == "neo4j":
        return Neo4jBackend(settings.neo4j_uri, settings.neo4j_user, settings.neo4j_password,
                            settings.neo4j_database or None, settings.file)
    return EmbeddedBackend(settings.file)


async def run(settings: config.Settings) -> None:
    async with backend_for(settings) as backend:
        onto = await backend.load()
        servicer = OntologyServicer(backend, onto, settings.cache_size)
        log.info("ontology version %d: %d nodes, %d edges", onto.version, len(onto.nodes), len(onto.edges))
        running = await start_server(settings, [Registration(
            ontology_service_pb2_grpc.add_OntologyServiceServicer_to_server, servicer, SERVICE)])

        async def reload_loop() -> None:
            while True:
                await asyncio.sleep(settings.reload_seconds)
                try:
                    await servicer.reload_if_changed()
                except Exception:
                    log.warning("ontology reload failed; serving version %d", servicer.onto.version, exc_info=True)

        task = asyncio.create_task(reload_loop()) if settings.backend == "neo4j" else None
        try:
            await serve_until_signal(running, settings.grace_seconds)
        finally:
            if task:
                task.cancel()


def main(argv: list[str] | None = None) -> int:
    return run_service("ontology", __doc__, config.Settings, config.PREFIX, run, argv,
                       startup_errors=(ConfigError, OntologyFileError, RuntimeError))

if __name__ == "__main__":
    sys.exit(main())
