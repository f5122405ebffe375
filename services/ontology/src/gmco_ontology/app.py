"""How the ontology service starts: settings -> graph backend -> servicer -> server, and, on a shared
backend (Neo4j), a supervised reload of changes other replicas wrote."""

from __future__ import annotations

import contextlib
import logging
from contextlib import AbstractAsyncContextManager

from gmco.ontology.v1 import ontology_service_pb2, ontology_service_pb2_grpc
from gmco_common.server import Registration, RunningServer, start_server
from gmco_common.supervisor import Supervisor

from gmco_ontology.backends import EmbeddedBackend, GraphBackend, Neo4jBackend
from gmco_ontology.config import Settings
from gmco_ontology.servicer import OntologyServicer

log = logging.getLogger("gmco_ontology")
SERVICE = ontology_service_pb2.DESCRIPTOR.services_by_name["OntologyService"].full_name


def open_graph(settings: Settings) -> AbstractAsyncContextManager[GraphBackend]:
    """The configured graph backend, as an async context manager."""
    if settings.backend == "neo4j":
        return Neo4jBackend(settings.neo4j_uri, settings.neo4j_user, settings.neo4j_password,
                            settings.neo4j_database or None, settings.file)
    return EmbeddedBackend(settings.file)


async def start(settings: Settings, stack: contextlib.AsyncExitStack) -> RunningServer:
    """Open the backend on ``stack``, load the graph and start the server (``__main__`` and the tests)."""
    backend = await stack.enter_async_context(open_graph(settings))
    onto = await backend.load()
    servicer = OntologyServicer(backend, onto, settings.cache_size)
    log.info("ontology version %d: %d nodes, %d edges", onto.version, len(onto.nodes), len(onto.edges))
    running = await start_server(settings, [Registration(
        ontology_service_pb2_grpc.add_OntologyServiceServicer_to_server, servicer, SERVICE)], stack=stack)
    if settings.backend == "neo4j":
        background = await stack.enter_async_context(Supervisor(running))
        background.every("ontology-reload", settings.reload_seconds, servicer.reload_if_changed)
    running.parts.update(backend=backend, servicer=servicer)
    return running
