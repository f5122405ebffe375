"""OntologyService: context -> Filter compilation (cached), admin mutations and export."""

from __future__ import annotations

import asyncio
import hashlib

import grpc
from gmco.ontology.v1 import ontology_service_pb2 as pb
from gmco.ontology.v1 import ontology_service_pb2_grpc
from gmco_common.errors import InvalidArgument
from gmco_common.lru import TtlLru
from prometheus_client import Counter, Histogram

from gmco_ontology.backends import GraphBackend, Mutation
from gmco_ontology.graph import Node, Ontology, compile_filter

RESOLVES = Counter("gmco_ontology_resolve_total", "ResolveConstraints calls by cache result.", ["result"])
RESOLVE_SECONDS = Histogram("gmco_ontology_resolve_seconds", "Time to compile a filter (cache misses).",
                            buckets=(0.0001, 0.0005, 0.001, 0.005, 0.01, 0.05, 0.1))


class OntologyServicer(ontology_service_pb2_grpc.OntologyServiceServicer):
    def __init__(self, backend: GraphBackend, onto: Ontology, cache_size: int = 10_000) -> None:
        self._backend = backend
        self.onto = onto
        # Keyed by the ontology version and the request, so a change of the graph never serves an old filter.
        self._cache: TtlLru[bytes, pb.ResolveConstraintsResponse] = TtlLru(cache_size, ttl=None)
        self._lock = asyncio.Lock()

    def resolve(self, request: pb.ResolveConstraintsRequest) -> pb.ResolveConstraintsResponse:
        onto = self.onto
        key = (onto.version.to_bytes(8, "little") + request.context.SerializeToString(deterministic=True)
               + b"\0" + request.preferences.SerializeToString(deterministic=True))
        hit = self._cache.get(key)
        if hit is not None:
            RESOLVES.labels("hit").inc()
            out = pb.ResolveConstraintsResponse()
            out.CopyFrom(hit)
            out.cached = True
            return out
        with RESOLVE_SECONDS.time():
            flt = compile_filter(onto, request.context, request.preferences)
        RESOLVES.labels("miss").inc()
        resp = pb.ResolveConstraintsResponse(filter=flt, context_hash=hashlib.sha256(key).hexdigest()[:16],
                                             ontology_version=onto.version)
        self._cache.put(key, resp)
        return resp

    async def ResolveConstraints(self, request: pb.ResolveConstraintsRequest,
                                 context: grpc.aio.ServicerContext) -> pb.ResolveConstraintsResponse:
        return self.resolve(request)

    async def _mutate(self, change: Mutation) -> int:
        async with self._lock:
            before = self.onto
            after = before.copy()
            change(after)  # validates; raises before anything is persisted
            await self._backend.persist(before, after)
            self.onto = after
            self._cache.clear()
            return after.version

    async def reload_if_changed(self) -> None:
        """Pick up changes other replicas wrote to a shared backend."""
        if await self._backend.version() > self.onto.version:
            async with self._lock:
                self.onto = await self._backend.load()
                self._cache.clear()

    async def UpsertNode(self, request: pb.UpsertNodeRequest, context) -> pb.UpsertNodeResponse:
        n = request.node
        if not request.HasField("node"):
            raise InvalidArgument("node", "is required")
        node = Node(n.id, n.kind, n.name or n.id, n.code)
        return pb.UpsertNodeResponse(ontology_version=await self._mutate(lambda o: o.upsert_node(node)))

    async def DeleteNode(self, request: pb.DeleteNodeRequest, context) -> pb.DeleteNodeResponse:
        if not request.id:
            raise InvalidArgument("id", "is required")
        return pb.DeleteNodeResponse(ontology_version=await self._mutate(lambda o: o.delete_node(request.id)))

    async def UpsertEdge(self, request: pb.UpsertEdgeRequest, context) -> pb.UpsertEdgeResponse:
        e = request.edge
        return pb.UpsertEdgeResponse(ontology_version=await self._mutate(
            lambda o: o.upsert_edge(e.kind, e.from_id, e.to_id)))

    async def DeleteEdge(self, request: pb.DeleteEdgeRequest, context) -> pb.DeleteEdgeResponse:
        e = request.edge
        return pb.DeleteEdgeResponse(ontology_version=await self._mutate(
            lambda o: o.delete_edge(e.kind, e.from_id, e.to_id)))

    async def ExportGraph(self, request: pb.ExportGraphRequest, context) -> pb.ExportGraphResponse:
        return self.onto.to_proto()
