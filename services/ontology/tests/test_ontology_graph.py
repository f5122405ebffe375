"""Unit tests: loading and validation with file positions, expansion rules, caching."""

from __future__ import annotations

import pytest
from gmco.common.v1 import common_pb2 as c
from gmco.ontology.v1 import ontology_service_pb2 as pb
from gmco_common.errors import FailedPrecondition, InvalidArgument, NotFound
from gmco_ontology.backends import EmbeddedBackend
from gmco_ontology.graph import Node, compile_filter
from gmco_ontology.loader import SAMPLE, OntologyFileError, load_file, parse
from gmco_ontology.servicer import OntologyServicer

K, E = pb.NodeKind, pb.EdgeKind


@pytest.fixture(scope="module")
def onto():
    return load_file(SAMPLE)


def ctx(region="US", device="smart_tv", surface=c.SURFACE_HOMEPAGE, max_rating=""):
    return c.RequestContext(surface=surface, region=region, device=device, max_rating=max_rating)


def test_sample_shape(onto) -> None:
    genres = [n for n in onto.nodes.values() if n.kind == K.NODE_KIND_GENRE]
    assert len(genres) == 100 and sorted(g.code for g in genres) == list(range(100))
    regions = sorted(n.code for n in onto.nodes.values() if n.kind == K.NODE_KIND_REGION)
    formats = sorted(n.code for n in onto.nodes.values() if n.kind == K.NODE_KIND_FORMAT)
    assert regions == list(range(8)) and formats == list(range(8))
    assert {n.code for n in onto.nodes.values() if n.kind == K.NODE_KIND_RATING} == set(range(6))


def test_blocking_a_genre_blocks_its_descendants(onto) -> None:
    f = compile_filter(onto, ctx(), c.UserPreferences(blocked_genres=["drama"]))
    kids = onto.descendants(["drama"])
    assert {"crime_drama", "police_procedural", "gangster"} <= kids
    assert set(f.blocked_genre_ids) == {onto.nodes[g].code for g in kids}


def test_device_admits_only_compatible_formats(onto) -> None:
    f = compile_filter(onto, ctx(device="legacy_stb"), c.UserPreferences())
    assert f.format_mask == 1 << onto.nodes["h264_sd"].code
    tv = compile_filter(onto, ctx(device="smart_tv"), c.UserPreferences())
    assert tv.format_mask == 0xFF


def test_region_sets_rating_ceiling_and_licensing(onto) -> None:
    us = compile_filter(onto, ctx(), c.UserPreferences())
    assert us.max_rating == 5 and us.region_mask == 1 << onto.nodes["US"].code and not us.blocked_genre_ids
    india = compile_filter(onto, ctx(region="IN"), c.UserPreferences())
    assert india.max_rating == 4 and onto.nodes["adult"].code in india.blocked_genre_ids
    kid = compile_filter(onto, ctx(max_rating="US:PG"), c.UserPreferences())
    assert kid.max_rating == 1
    # The stricter of region ceiling and profile applies.
    assert compile_filter(onto, ctx(region="IN", max_rating="US:NC-17"), c.UserPreferences()).max_rating == 4


def test_allowed_genres_expand_and_exclude_blocked(onto) -> None:
    f = compile_filter(onto, ctx(), c.UserPreferences(allowed_genres=["comedy"], blocked_genres=["sitcom"]))
    codes = {onto.nodes[g].code for g in onto.descendants(["comedy"]) - {"sitcom"}}
    assert set(f.allowed_genre_ids) == codes


@pytest.mark.parametrize("context, prefs, field", [
    (ctx(region="XX"), c.UserPreferences(), "context.region"),
    (ctx(device="toaster"), c.UserPreferences(), "context.device"),
    (ctx(region=""), c.UserPreferences(), "context.region"),
    (ctx(device=""), c.UserPreferences(), "context.device"),
    (ctx(surface=c.SURFACE_UNSPECIFIED), c.UserPreferences(), "context.surface"),
    (ctx(surface=42), c.UserPreferences(), "context.surface"),
    (ctx(max_rating="US:XXX"), c.UserPreferences(), "context.max_rating"),
    (ctx(), c.UserPreferences(blocked_genres=["polka"]), "preferences.blocked_genres[0]"),
    (ctx(), c.UserPreferences(allowed_genres=["drama", "nope"]), "preferences.allowed_genres[1]"),
])
def test_bad_context_names_field_and_value(onto, context, prefs, field) -> None:
    with pytest.raises(InvalidArgument) as err:
        compile_filter(onto, context, prefs)
    assert err.value.field == field


BASE = """
genres:
  - {id: drama, code: 0}
  - {id: crime, code: 1, parent: drama}
formats:
  - {id: sd, code: 0}
devices:
  - {id: tv, formats: [sd]}
regions:
  - {id: US, code: 0}
"""


@pytest.mark.parametrize("extra, message, line", [
    ("  - {id: drama, code: 7}\n", "duplicate id 'drama'", 5),
    ("  - {id: other, code: 1}\n", "reuses code 1", 5),
    ("  - {id: orphan, code: 9, parent: ghost}\n", "unknown node 'ghost'", 5),
])
def test_validation_errors_name_node_and_position(extra, message, line) -> None:
    text = BASE.replace("  - {id: crime, code: 1, parent: drama}\n",
                        "  - {id: crime, code: 1, parent: drama}\n" + extra)
    with pytest.raises(OntologyFileError, match=message) as err:
        parse(text, "o.yaml")
    assert f"o.yaml:{line}:" in str(err.value)


def test_cycles_and_malformed_files_are_rejected() -> None:
    cyc = BASE.replace("{id: drama, code: 0}", "{id: drama, code: 0, parent: crime}")
    with pytest.raises(OntologyFileError, match="cycle"):
        parse(cyc, "c.yaml")
    with pytest.raises(OntologyFileError, match="not valid YAML"):
        parse("genres: [", "bad.yaml")
    with pytest.raises(OntologyFileError, match="missing 'formats'"):
        parse(BASE.replace("formats: [sd]", "name: TV"), "d.yaml")


async def test_cache_hits_and_invalidation_on_change() -> None:
    backend = EmbeddedBackend(SAMPLE)
    svc = OntologyServicer(backend, await backend.load())
    req = pb.ResolveConstraintsRequest(context=ctx(), preferences=c.UserPreferences(blocked_genres=["horror"]))
    first = svc.resolve(req)
    again = svc.resolve(req)
    assert not first.cached and again.cached and again.context_hash == first.context_hash
    # A new subgenre of horror: the cached filter is dropped and the new genre is blocked too.
    await svc.UpsertNode(pb.UpsertNodeRequest(node=pb.Node(id="cosmic_horror", kind=K.NODE_KIND_GENRE, code=500)),
                         None)
    await svc.UpsertEdge(pb.UpsertEdgeRequest(edge=pb.Edge(kind=E.EDGE_KIND_SUBGENRE_OF, from_id="cosmic_horror",
                                                           to_id="horror")), None)
    after = svc.resolve(req)
    assert not after.cached and 500 in after.filter.blocked_genre_ids and after.context_hash != first.context_hash


async def test_admin_errors() -> None:
    backend = EmbeddedBackend(SAMPLE)
    svc = OntologyServicer(backend, await backend.load())
    with pytest.raises(InvalidArgument, match="cycle"):
        await svc.UpsertEdge(pb.UpsertEdgeRequest(edge=pb.Edge(kind=E.EDGE_KIND_SUBGENRE_OF, from_id="drama",
                                                               to_id="crime_drama")), None)
    with pytest.raises(InvalidArgument, match="needs a device"):
        await svc.UpsertEdge(pb.UpsertEdgeRequest(edge=pb.Edge(kind=E.EDGE_KIND_COMPATIBLE_WITH, from_id="hdr10",
                                                               to_id="US")), None)
    with pytest.raises(InvalidArgument, match="code 1 is already used"):
        await svc.UpsertNode(pb.UpsertNodeRequest(node=pb.Node(id="x", kind=K.NODE_KIND_GENRE, code=1)), None)
    with pytest.raises(FailedPrecondition):
        await svc.DeleteNode(pb.DeleteNodeRequest(id="drama"), None)
    with pytest.raises(NotFound):
        await svc.DeleteNode(pb.DeleteNodeRequest(id="nope"), None)
    v = (await svc.DeleteNode(pb.DeleteNodeRequest(id="gangster"), None)).ontology_version
    assert v > 1 and "gangster" not in svc.onto.nodes
    assert Node("gangster", K.NODE_KIND_GENRE, "", 3) not in svc.onto.nodes.values()
