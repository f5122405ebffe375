from __future__ import annotations

import os

import grpc
import pytest
from gmco.ontology.v1 import ontology_service_pb2_grpc
from gmco_common.config import ServerSettings
from gmco_common.server import Registration, start_server
from gmco_ontology.backends import EmbeddedBackend, Neo4jBackend
from gmco_ontology.loader import SAMPLE
from gmco_ontology.servicer import OntologyServicer


@pytest.fixture(params=["embedded", "neo4j"])
async def ontology_stub(request):
    """A real OntologyService on port 0 over each backend (Neo4j only where NEO4J_URI is set)."""
    if request.param == "embedded":
        backend = EmbeddedBackend(SAMPLE)
    else:
        uri = os.environ.get("NEO4J_URI")
        if not uri:
            pytest.skip("neo4j: NEO4J_URI is not set (no Neo4j server can be installed on this machine)")
        backend = Neo4jBackend(uri, os.environ.get("NEO4J_USER", "neo4j"), os.environ.get("NEO4J_PASSWORD", ""),
                               None, SAMPLE)
    async with backend:
        servicer = OntologyServicer(backend, await backend.load())
        running = await start_server(ServerSettings(port=0), [Registration(
            ontology_service_pb2_grpc.add_OntologyServiceServicer_to_server, servicer,
            "gmco.ontology.v1.OntologyService")])
        async with grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as ch:
            yield ontology_service_pb2_grpc.OntologyServiceStub(ch)
        await running.server.stop(0)
