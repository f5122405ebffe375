"""The media ontology as an in-memory graph, and its compilation into shard filters.

Nodes: Genre (a tree through SUBGENRE_OF), Rating (regional ladders; ``code`` is the global level
0 = all ages .. 5 = adults only), Region (``code`` = bit index), Format (``code`` = bit index), Device.
Edges: SUBGENRE_OF Genre->Genre, COMPATIBLE_WITH Format->Device, LICENSES Region->Genre,
MAX_RATING Region->Rating, NEXT_RATING Rating->Rating.

A region with no LICENSES edges licenses every genre; otherwise it licenses exactly the genres it
has LICENSES edges to (edges are per genre; the file format's subtree notation is expanded on load).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from gmco.common.v1 import common_pb2
from gmco.ontology.v1 import ontology_service_pb2 as pb
from gmco_common.errors import FailedPrecondition, InvalidArgument, NotFound

K = pb.NodeKind
E = pb.EdgeKind
KIND_NAMES = {K.NODE_KIND_GENRE: "genre", K.NODE_KIND_RATING: "rating", K.NODE_KIND_REGION: "region",
              K.NODE_KIND_FORMAT: "format", K.NODE_KIND_DEVICE: "device"}
# Allowed (from kind, to kind) per edge kind.
EDGE_ENDS = {
    E.EDGE_KIND_SUBGENRE_OF: (K.NODE_KIND_GENRE, K.NODE_KIND_GENRE),
    E.EDGE_KIND_COMPATIBLE_WITH: (K.NODE_KIND_FORMAT, K.NODE_KIND_DEVICE),
    E.EDGE_KIND_LICENSES: (K.NODE_KIND_REGION, K.NODE_KIND_GENRE),
    E.EDGE_KIND_MAX_RATING: (K.NODE_KIND_REGION, K.NODE_KIND_RATING),
    E.EDGE_KIND_NEXT_RATING: (K.NODE_KIND_RATING, K.NODE_KIND_RATING),
}
BIT_KINDS = (K.NODE_KIND_REGION, K.NODE_KIND_FORMAT)
# Edge kinds where a node has at most one outgoing edge.
SINGLE_OUT = (E.EDGE_KIND_SUBGENRE_OF, E.EDGE_KIND_MAX_RATING, E.EDGE_KIND_NEXT_RATING)


@dataclass(frozen=True)
class Node:
    id: str
    kind: int
    name: str
    code: int


@dataclass
class Ontology:
    nodes: dict[str, Node] = field(default_factory=dict)
    edges: set[tuple[int, str, str]] = field(default_factory=set)  # (kind, from, to)
    version: int = 1

    # Adjacency lists, built once per snapshot on first use (mutations run on copies and reset them).
    _out: dict[tuple[int, str], list[str]] | None = field(default=None, repr=False, compare=False)
    _in: dict[tuple[int, str], list[str]] | None = field(default=None, repr=False, compare=False)

    def _index(self) -> None:
        out: dict[tuple[int, str], list[str]] = {}
        into: dict[tuple[int, str], list[str]] = {}
        for k, f, t in sorted(self.edges):
            out.setdefault((k, f), []).append(t)
            into.setdefault((k, t), []).append(f)
        self._out, self._in = out, into

    def add_loaded_edge(self, kind: int, src: str, dst: str) -> None:
        """Add an edge while loading a file (checked by the loader; no version bump)."""
        if (kind, src, dst) in self.edges:
            return
        self.edges.add((kind, src, dst))
        if self._out is not None and self._in is not None:  # keep the index current instead of rebuilding
            self._out.setdefault((kind, src), []).append(dst)
            self._in.setdefault((kind, dst), []).append(src)

    def _touch(self) -> None:
        self._out = self._in = None
        self.version += 1

    # -- queries ------------------------------------------------------------------------------
    def node(self, node_id: str, kind: int, what: str) -> Node:
        n = self.nodes.get(node_id)
        if n is None or n.kind != kind:
            raise InvalidArgument(what, f"unknown {KIND_NAMES[kind]} {node_id!r}")
        return n

    def out(self, kind: int, src: str) -> list[str]:
        if self._out is None:
            self._index()
        return self._out.get((kind, src), [])  # type: ignore[union-attr]

    def into(self, kind: int, dst: str) -> list[str]:
        if self._in is None:
            self._index()
        return self._in.get((kind, dst), [])  # type: ignore[union-attr]

    def children(self) -> dict[str, list[str]]:
        if self._in is None:
            self._index()
        return {t: fs for (k, t), fs in self._in.items() if k == E.EDGE_KIND_SUBGENRE_OF}  # type: ignore[union-attr]

    def descendants(self, roots: Iterable[str], kids: dict[str, list[str]] | None = None) -> set[str]:
        """The genres and all their subgenres."""
        kids = self.children() if kids is None else kids
        out, stack = set(), list(roots)
        while stack:
            g = stack.pop()
            if g not in out:
                out.add(g)
                stack.extend(kids.get(g, ()))
        return out

    def copy(self) -> Ontology:
        return Ontology(dict(self.nodes), set(self.edges), self.version)

    @property
    def genre_ids(self) -> set[str]:
        return {n.id for n in self.nodes.values() if n.kind == K.NODE_KIND_GENRE}

    # -- validation ---------------------------------------------------------------------------
    def check_node(self, node: Node) -> None:
        if not node.id:
            raise InvalidArgument("node.id", "is required")
        if node.kind not in KIND_NAMES:
            raise InvalidArgument("node.kind", f"unknown node kind {node.kind}")
        if node.kind in BIT_KINDS and node.code >= 64:
            raise InvalidArgument("node.code", f"{KIND_NAMES[node.kind]} codes are bit indexes 0..63")
        existing = self.nodes.get(node.id)
        if existing is not None and existing.kind != node.kind:
            raise InvalidArgument("node.id", f"{node.id!r} is already a {KIND_NAMES[existing.kind]}")
        if node.kind != K.NODE_KIND_RATING:  # rating codes are shared ladder levels
            for other in self.nodes.values():
                if other.kind == node.kind and other.code == node.code and other.id != node.id:
                    raise InvalidArgument("node.code", f"code {node.code} is already used by {other.id!r}")

    def check_edge(self, kind: int, src: str, dst: str) -> None:
        if kind not in EDGE_ENDS:
            raise InvalidArgument("edge.kind", f"unknown edge kind {kind}")
        want_from, want_to = EDGE_ENDS[kind]
        for end, node_id, want in (("edge.from_id", src, want_from), ("edge.to_id", dst, want_to)):
            n = self.nodes.get(node_id)
            if n is None:
                raise InvalidArgument(end, f"unknown node {node_id!r}")
            if n.kind != want:
                raise InvalidArgument(end, f"{node_id!r} is a {KIND_NAMES[n.kind]}; "
                                           f"{pb.EdgeKind.Name(kind)} needs a {KIND_NAMES[want]}")
        if kind in (E.EDGE_KIND_SUBGENRE_OF, E.EDGE_KIND_NEXT_RATING) and (
                src == dst or src in self._reachable(kind, dst)):
            raise InvalidArgument("edge", f"{src!r} -> {dst!r} would create a cycle")

    def _reachable(self, kind: int, start: str) -> set[str]:
        seen, stack = set(), [start]
        while stack:
            for nxt in self.out(kind, stack.pop()):
                if nxt not in seen:
                    seen.add(nxt)
                    stack.append(nxt)
        return seen

    # -- mutations (copy-on-write by the caller) ------------------------------------------------
    def upsert_node(self, node: Node) -> None:
        self.check_node(node)
        self.nodes[node.id] = node
        self._touch()

    def delete_node(self, node_id: str) -> None:
        if node_id not in self.nodes:
            raise NotFound(f"no node {node_id!r}")
        if self.into(E.EDGE_KIND_SUBGENRE_OF, node_id):
            raise FailedPrecondition(f"genre {node_id!r} still has subgenres; delete or move them first")
        del self.nodes[node_id]
        self.edges = {e for e in self.edges if node_id not in (e[1], e[2])}
        self._touch()

    def upsert_edge(self, kind: int, src: str, dst: str) -> None:
        self.check_edge(kind, src, dst)
        if kind in SINGLE_OUT:
            self.edges = {e for e in self.edges if not (e[0] == kind and e[1] == src)}
        self.edges.add((kind, src, dst))
        self._touch()

    def delete_edge(self, kind: int, src: str, dst: str) -> None:
        if (kind, src, dst) not in self.edges:
            raise NotFound(f"no {pb.EdgeKind.Name(kind) if kind in EDGE_ENDS else kind} edge {src!r} -> {dst!r}")
        self.edges.discard((kind, src, dst))
        self._touch()

    # -- proto --------------------------------------------------------------------------------
    def to_proto(self) -> pb.ExportGraphResponse:
        return pb.ExportGraphResponse(
            nodes=[pb.Node(id=n.id, kind=n.kind, name=n.name, code=n.code) for n in sorted(self.nodes.values(),
                                                                                          key=lambda n: n.id)],
            edges=[pb.Edge(kind=k, from_id=f, to_id=t) for k, f, t in sorted(self.edges)],
            ontology_version=self.version,
        )


SURFACES = {common_pb2.SURFACE_HOMEPAGE, common_pb2.SURFACE_VIDEO_PAGE, common_pb2.SURFACE_SEARCH_RESULTS}


def compile_filter(onto: Ontology, ctx: common_pb2.RequestContext,
                   prefs: common_pb2.UserPreferences) -> common_pb2.Filter:
    """Expand the graph for one context into the flat Filter the shards evaluate."""
    if ctx.surface not in SURFACES:
        raise InvalidArgument("context.surface", f"unknown or missing surface {ctx.surface}; use "
                                                 "SURFACE_HOMEPAGE, SURFACE_VIDEO_PAGE or SURFACE_SEARCH_RESULTS")
    if not ctx.region:
        raise InvalidArgument("context.region", "is required (an ontology Region id such as 'US')")
    if not ctx.device:
        raise InvalidArgument("context.device", "is required (an ontology Device id such as 'smart_tv')")
    region = onto.node(ctx.region, K.NODE_KIND_REGION, "context.region")
    device = onto.node(ctx.device, K.NODE_KIND_DEVICE, "context.device")
    kids = onto.children()
    f = common_pb2.Filter(region_mask=1 << region.code)
    fmt_mask = 0
    for fmt in onto.into(E.EDGE_KIND_COMPATIBLE_WITH, device.id):
        fmt_mask |= 1 << onto.nodes[fmt].code
    if fmt_mask == 0:
        raise InvalidArgument("context.device", f"device {device.id!r} plays no format in the ontology")
    f.format_mask = fmt_mask
    ceilings = [onto.nodes[r].code for r in onto.out(E.EDGE_KIND_MAX_RATING, region.id)]
    if ctx.max_rating:
        ceilings.append(onto.node(ctx.max_rating, K.NODE_KIND_RATING, "context.max_rating").code)
    if ceilings:
        f.max_rating = min(ceilings)
    blocked = onto.descendants((_genre(onto, g, f"preferences.blocked_genres[{i}]")
                                for i, g in enumerate(prefs.blocked_genres)), kids)
    licensed = onto.out(E.EDGE_KIND_LICENSES, region.id)
    if licensed:
        blocked |= onto.genre_ids - set(licensed)
    if prefs.allowed_genres:
        allowed = onto.descendants((_genre(onto, g, f"preferences.allowed_genres[{i}]")
                                    for i, g in enumerate(prefs.allowed_genres)), kids) - blocked
        if not allowed:
            raise InvalidArgument("preferences.allowed_genres", "every allowed genre is blocked or unlicensed")
        f.allowed_genre_ids.extend(sorted(onto.nodes[g].code for g in allowed))
    f.blocked_genre_ids.extend(sorted(onto.nodes[g].code for g in blocked))
    return f


def _genre(onto: Ontology, gid: str, what: str) -> str:
    return onto.node(gid, K.NODE_KIND_GENRE, what).id
