"""Where the ontology lives. Resolution always runs on an in-memory snapshot; a backend loads it and
persists admin changes.

- ``EmbeddedBackend``: the graph from a YAML/JSON file, held in memory (admin changes last until restart).
- ``Neo4jBackend``: the official async driver, parameterised Cypher only; constraints and indexes
  created at start; seeded from the file when the database is empty; transient errors retried.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Protocol, Self

from gmco.ontology.v1 import ontology_service_pb2 as pb
from gmco_common.errors import Unavailable

from gmco_ontology.graph import KIND_NAMES, Node, Ontology
from gmco_ontology.loader import load_file

log = logging.getLogger(__name__)
Mutation = Callable[[Ontology], None]
_LABELS = {k: v.capitalize() for k, v in KIND_NAMES.items()}
_KINDS = {v: k for k, v in _LABELS.items()}


class GraphBackend(Protocol):
    async def __aenter__(self) -> Self: ...
    async def __aexit__(self, *exc: object) -> None: ...
    async def load(self) -> Ontology: ...
    async def persist(self, before: Ontology, after: Ontology) -> None: ...
    async def version(self) -> int: ...


class EmbeddedBackend:
    def __init__(self, path: Path) -> None:
        self._path = path
        self._version = 0

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc: object) -> None:
        return None

    async def load(self) -> Ontology:
        onto = load_file(self._path)
        self._version = onto.version
        return onto

    async def persist(self, before: Ontology, after: Ontology) -> None:
        self._version = after.version

    async def version(self) -> int:
        return self._version


class Neo4jBackend:
    """Nodes carry a label per kind and ``id``, ``name``, ``code``; edges are typed relationships."""

    def __init__(self, uri: str, user: str, password: str, database: str | None, seed_file: Path) -> None:
        self._uri, self._auth, self._database, self._seed = uri, (user, password), database, seed_file
        self._driver = None

    async def __aenter__(self) -> Self:
        from neo4j import AsyncGraphDatabase

        self._driver = AsyncGraphDatabase.driver(self._uri, auth=self._auth if self._auth[0] else None)
        try:
            await self._driver.verify_connectivity()
            for label in _LABELS.values():
                await self._write(f"CREATE CONSTRAINT {label.lower()}_id IF NOT EXISTS "
                                  f"FOR (n:{label}) REQUIRE n.id IS UNIQUE")
            await self._write("CREATE INDEX genre_code IF NOT EXISTS FOR (n:Genre) ON (n.code)")
            count = await self._read("MATCH (n) WHERE n:Genre OR n:Region RETURN count(n) AS c")
            if count[0]["c"] == 0:
                log.info("neo4j is empty: seeding the ontology from %s", self._seed)
                await self.persist(Ontology(version=0), load_file(self._seed))
        except Exception as exc:
            await self._driver.close()
            raise Unavailable(f"neo4j at {self._uri} is unreachable or refused the schema: {exc}") from exc
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._driver is not None:
            await self._driver.close()

    async def _write(self, query: str, **params) -> None:
        async with self._driver.session(database=self._database) as session:
            await session.execute_write(lambda tx: tx.run(query, **params))

    async def _read(self, query: str, **params) -> list[dict]:
        async def work(tx):
            result = await tx.run(query, **params)
            return [r.data() async for r in result]

        async with self._driver.session(database=self._database) as session:
            return await session.execute_read(work)

    async def version(self) -> int:
        rows = await self._read("MATCH (m:OntologyMeta {key: 'main'}) RETURN m.version AS v")
        return int(rows[0]["v"]) if rows else 0

    async def load(self) -> Ontology:
        onto = Ontology(version=await self.version() or 1)
        for row in await self._read("MATCH (n) WHERE n.id IS NOT NULL AND NOT n:OntologyMeta "
                                    "RETURN labels(n) AS labels, n.id AS id, n.name AS name, n.code AS code"):
            kind = next(_KINDS[lbl] for lbl in row["labels"] if lbl in _KINDS)
            onto.nodes[row["id"]] = Node(row["id"], kind, row["name"] or row["id"], int(row["code"] or 0))
        for row in await self._read("MATCH (a)-[r]->(b) RETURN type(r) AS t, a.id AS a, b.id AS b"):
            onto.add_loaded_edge(pb.EdgeKind.Value("EDGE_KIND_" + row["t"]), row["a"], row["b"])
        return onto

    async def persist(self, before: Ontology, after: Ontology) -> None:
        """Write the difference between two snapshots in one transaction (retried on transient errors)."""
        gone_nodes = [n for n in before.nodes if n not in after.nodes]
        new_nodes = [n for i, n in after.nodes.items() if before.nodes.get(i) != n]
        gone_edges = before.edges - after.edges
        new_edges = after.edges - before.edges

        async def work(tx):
            for node_id in gone_nodes:
                await tx.run("MATCH (n {id: $id}) DETACH DELETE n", id=node_id)
            for n in new_nodes:
                await tx.run(f"MERGE (n:{_LABELS[n.kind]} {{id: $id}}) SET n.name = $name, n.code = $code",
                             id=n.id, name=n.name, code=n.code)
            for kind, a, b in gone_edges:
                rel = pb.EdgeKind.Name(kind).removeprefix("EDGE_KIND_")
                await tx.run(f"MATCH (a {{id: $a}})-[r:{rel}]->(b {{id: $b}}) DELETE r", a=a, b=b)
            for kind, a, b in new_edges:
                rel = pb.EdgeKind.Name(kind).removeprefix("EDGE_KIND_")
                await tx.run(f"MATCH (a {{id: $a}}), (b {{id: $b}}) MERGE (a)-[:{rel}]->(b)", a=a, b=b)
            await tx.run("MERGE (m:OntologyMeta {key: 'main'}) SET m.version = $v", v=after.version)

        try:
            async with self._driver.session(database=self._database) as session:
                await session.execute_write(work)  # the driver retries transient errors
        except Exception as exc:
            raise Unavailable(f"neo4j write failed: {exc.__class__.__name__}; retry") from exc
