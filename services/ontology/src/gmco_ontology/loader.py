"""Load and validate an ontology file (YAML or JSON, which is YAML too).

Errors name the node and its position in the file (``path:line:column``): duplicate ids and codes,
unknown references, and cycles in the genre tree are all rejected before anything is served.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from gmco.ontology.v1 import ontology_service_pb2 as pb

from gmco_ontology.graph import Node, Ontology

K = pb.NodeKind
E = pb.EdgeKind


class OntologyFileError(ValueError):
    """The file is malformed; the message says where and what."""


class _Doc:
    """The parsed YAML with the line/column of each mapping, for error messages."""

    def __init__(self, path: str, text: str) -> None:
        self.path = path
        try:
            self.root = yaml.compose(text)
        except yaml.YAMLError as exc:
            raise OntologyFileError(f"{path}: not valid YAML/JSON: {exc}") from None
        if not isinstance(self.root, yaml.MappingNode):
            raise OntologyFileError(f"{path}: the top level must be a mapping with genres, ratings, regions, "
                                    "formats and devices")

    def where(self, node: yaml.Node) -> str:
        return f"{self.path}:{node.start_mark.line + 1}:{node.start_mark.column + 1}"

    def section(self, name: str) -> list[yaml.Node]:
        for key, value in self.root.value:
            if key.value == name:
                if not isinstance(value, yaml.SequenceNode):
                    raise OntologyFileError(f"{self.where(value)}: '{name}' must be a list")
                return value.value
        return []


def _fields(doc: _Doc, node: yaml.Node, required: tuple[str, ...]) -> dict[str, Any]:
    if not isinstance(node, yaml.MappingNode):
        raise OntologyFileError(f"{doc.where(node)}: expected a mapping")
    values = {k.value: yaml.safe_load(yaml.serialize(v)) for k, v in node.value}
    for name in required:
        if values.get(name) in (None, ""):
            raise OntologyFileError(f"{doc.where(node)}: missing '{name}'")
    return values


def parse(text: str, path: str = "<ontology>") -> Ontology:
    doc = _Doc(path, text)
    onto = Ontology()
    where: dict[str, str] = {}
    codes: dict[tuple[int, int], str] = {}
    refs: list[tuple[int, str, str, str, str]] = []  # (edge kind, from, to, position, what)
    licensing: list[tuple[str, str, list[str], str]] = []

    def add(node_yaml: yaml.Node, kind: int, values: dict[str, Any], node_id: str) -> None:
        pos = doc.where(node_yaml)
        if node_id in where:
            raise OntologyFileError(f"{pos}: duplicate id {node_id!r} (first defined at {where[node_id]})")
        code = values.get("code", 0)
        if not isinstance(code, int) or code < 0:
            raise OntologyFileError(f"{pos}: node {node_id!r} has an invalid code {code!r}; use an integer >= 0")
        if kind in (K.NODE_KIND_REGION, K.NODE_KIND_FORMAT) and code >= 64:
            raise OntologyFileError(f"{pos}: node {node_id!r}: region and format codes are bit indexes 0..63")
        if kind != K.NODE_KIND_RATING and kind != K.NODE_KIND_DEVICE:
            if (kind, code) in codes:
                raise OntologyFileError(f"{pos}: node {node_id!r} reuses code {code} of {codes[(kind, code)]!r}")
            codes[(kind, code)] = node_id
        where[node_id] = pos
        onto.nodes[node_id] = Node(node_id, kind, str(values.get("name", node_id)), code)

    for g in doc.section("genres"):
        v = _fields(doc, g, ("id",))
        add(g, K.NODE_KIND_GENRE, v, str(v["id"]))
        if v.get("parent"):
            refs.append((E.EDGE_KIND_SUBGENRE_OF, str(v["id"]), str(v["parent"]), doc.where(g), "parent"))
    for ladder in doc.section("ratings"):
        lv = _fields(doc, ladder, ("ladder", "levels"))
        previous = None
        for level_node in ladder.value[[k.value for k, _ in ladder.value].index("levels")][1].value:
            v = _fields(doc, level_node, ("id", "code"))
            add(level_node, K.NODE_KIND_RATING, v, str(v["id"]))
            if previous is not None:
                if onto.nodes[previous].code > v["code"]:
                    raise OntologyFileError(f"{doc.where(level_node)}: rating {v['id']!r} is below the previous "
                                            f"step {previous!r} of ladder {lv['ladder']!r}; list levels in order")
                refs.append((E.EDGE_KIND_NEXT_RATING, previous, str(v["id"]), doc.where(level_node), "ladder"))
            previous = str(v["id"])
    for fmt in doc.section("formats"):
        v = _fields(doc, fmt, ("id", "code"))
        add(fmt, K.NODE_KIND_FORMAT, v, str(v["id"]))
    for dev in doc.section("devices"):
        v = _fields(doc, dev, ("id", "formats"))
        add(dev, K.NODE_KIND_DEVICE, v, str(v["id"]))
        for f in v["formats"]:
            refs.append((E.EDGE_KIND_COMPATIBLE_WITH, str(f), str(v["id"]), doc.where(dev), "formats"))
    for reg in doc.section("regions"):
        v = _fields(doc, reg, ("id", "code"))
        add(reg, K.NODE_KIND_REGION, v, str(v["id"]))
        if v.get("max_rating"):
            refs.append((E.EDGE_KIND_MAX_RATING, str(v["id"]), str(v["max_rating"]), doc.where(reg), "max_rating"))
        if v.get("licenses") and v.get("licenses_all_except"):
            raise OntologyFileError(f"{doc.where(reg)}: region {v['id']!r}: use licenses or licenses_all_except")
        for key in ("licenses", "licenses_all_except"):
            if v.get(key):
                licensing.append((str(v["id"]), key, [str(g) for g in v[key]], doc.where(reg)))

    for kind, src, dst, pos, what in refs:
        for end in (src, dst):
            if end not in onto.nodes:
                raise OntologyFileError(f"{pos}: {what} of {src!r} refers to unknown node {end!r}")
        try:
            onto.check_edge(kind, src, dst)
        except Exception as exc:  # noqa: BLE001 - re-raised with the file position
            raise OntologyFileError(f"{pos}: {what} of {src!r}: {exc}") from None
        onto.add_loaded_edge(kind, src, dst)
    # Licensing is stored per genre (LICENSES edges are not inherited), expanded here from the file's
    # subtree notation once the genre tree exists.
    all_genres = {n.id for n in onto.nodes.values() if n.kind == K.NODE_KIND_GENRE}
    for region, key, listed, pos in licensing:
        for g in listed:
            if g not in all_genres:
                raise OntologyFileError(f"{pos}: {key} of {region!r} refers to unknown genre {g!r}")
        subtree = onto.descendants(listed)
        for g in (subtree if key == "licenses" else all_genres - subtree):
            onto.add_loaded_edge(E.EDGE_KIND_LICENSES, region, g)
    return onto


def load_file(path: Path | str) -> Ontology:
    p = Path(path)
    try:
        text = p.read_text()
    except OSError as exc:
        raise OntologyFileError(f"cannot read ontology file {p}: {exc.strerror}") from None
    return parse(text, str(p))


SAMPLE = Path(__file__).parent / "data" / "sample_ontology.yaml"
