"""One contract suite through gRPC, over the embedded backend and (where NEO4J_URI is set) Neo4j."""

from __future__ import annotations

import grpc
import pytest
from gmco.common.v1 import common_pb2 as c
from gmco.ontology.v1 import ontology_service_pb2 as pb

K, E = pb.NodeKind, pb.EdgeKind


def _req(**kw):
    context = {"surface": c.SURFACE_HOMEPAGE, "region": "GB", "device": "ios_phone"}
    context.update(kw)
    return pb.ResolveConstraintsRequest(context=c.RequestContext(**context))


async def test_resolve_and_cache(ontology_stub) -> None:
    first = await ontology_stub.ResolveConstraints(_req())
    assert first.filter.region_mask == 1 << 1 and first.filter.max_rating == 4 and first.context_hash  # GB:18
    assert (await ontology_stub.ResolveConstraints(_req())).cached


@pytest.mark.parametrize("kw, field", [({"region": "ZZ"}, "context.region"), ({"device": "fridge"}, "context.device"),
                                       ({"surface": 0}, "context.surface")])
async def test_unknown_values_are_invalid_argument(ontology_stub, kw, field) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await ontology_stub.ResolveConstraints(_req(**kw))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and err.value.details().startswith(field)


async def test_admin_round_trip_and_export(ontology_stub) -> None:
    v0 = (await ontology_stub.ExportGraph(pb.ExportGraphRequest())).ontology_version
    v1 = (await ontology_stub.UpsertNode(pb.UpsertNodeRequest(
        node=pb.Node(id="k_drama", kind=K.NODE_KIND_GENRE, name="K-Drama", code=321)))).ontology_version
    await ontology_stub.UpsertEdge(pb.UpsertEdgeRequest(edge=pb.Edge(kind=E.EDGE_KIND_SUBGENRE_OF,
                                                                     from_id="k_drama", to_id="drama")))
    graph = await ontology_stub.ExportGraph(pb.ExportGraphRequest())
    assert v1 > v0 and any(n.id == "k_drama" and n.code == 321 for n in graph.nodes)
    blocked = await ontology_stub.ResolveConstraints(pb.ResolveConstraintsRequest(
        context=_req().context, preferences=c.UserPreferences(blocked_genres=["drama"])))
    assert 321 in blocked.filter.blocked_genre_ids
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await ontology_stub.DeleteEdge(pb.DeleteEdgeRequest(edge=pb.Edge(kind=E.EDGE_KIND_SUBGENRE_OF,
                                                                         from_id="k_drama", to_id="comedy")))
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    await ontology_stub.DeleteEdge(pb.DeleteEdgeRequest(edge=pb.Edge(kind=E.EDGE_KIND_SUBGENRE_OF,
                                                                     from_id="k_drama", to_id="drama")))
    await ontology_stub.DeleteNode(pb.DeleteNodeRequest(id="k_drama"))
    graph = await ontology_stub.ExportGraph(pb.ExportGraphRequest())
    assert not any(n.id == "k_drama" for n in graph.nodes)
