from __future__ import annotations

import os

import pytest
from gmco.ontology.v1 import ontology_service_pb2_grpc
from gmco_ontology.app import start
from gmco_ontology.config import Settings
from gmco_testing.component import component


@pytest.fixture(params=["embedded", "neo4j"])
async def ontology_stub(request):
    """The OntologyService through its own ``start`` on port 0, over each backend (Neo4j only where
    NEO4J_URI is set)."""
    if request.param == "embedded":
        settings = Settings(port=0)
    else:
        uri = os.environ.get("NEO4J_URI")
        if not uri:
            pytest.skip("neo4j: NEO4J_URI is not set (no Neo4j server can be installed on this machine)")
        settings = Settings(port=0, backend="neo4j", neo4j_uri=uri, neo4j_user=os.environ.get("NEO4J_USER", "neo4j"),
                            neo4j_password=os.environ.get("NEO4J_PASSWORD", ""))
    async with component(start, settings) as svc:
        yield svc.stub(ontology_service_pb2_grpc.OntologyServiceStub)
