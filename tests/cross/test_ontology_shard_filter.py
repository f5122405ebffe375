"""Cross-service: a Filter the ontology compiles, applied by the shard, returns only permitted items.

Each returned item is checked independently against the ontology's rules (not against the Filter),
so a mismatch between what the ontology emits and what the shard evaluates fails here.
"""

from __future__ import annotations

import numpy as np
import pytest
from gmco.common.v1 import common_pb2 as c
from gmco.ontology.v1 import ontology_service_pb2 as pb
from gmco_common.datagen import generate_catalogue, generate_queries
from gmco_ontology.graph import compile_filter
from gmco_ontology.loader import SAMPLE, load_file
from gmco_shard.columns import columns_from_catalogue
from gmco_shard.filters import evaluate_filter
from gmco_shard.index.params import HnswParams, IndexParams
from gmco_shard.store import ShardStore

E = pb.EdgeKind


@pytest.fixture(scope="module")
def world():
    onto = load_file(SAMPLE)
    cat = generate_catalogue(4000, dim=32, n_clusters=40, seed=4)
    store = ShardStore(32, "hnsw", IndexParams(hnsw=HnswParams(m=8, ef_construction=40)))
    store.bulk_load(np.asarray(cat.vectors), columns_from_catalogue(cat))
    return onto, cat, store


def permitted_rows(onto, cat, ctx: c.RequestContext, prefs: c.UserPreferences) -> np.ndarray:
    """The ontology's rules, evaluated directly for every item (a plain loop, not the shard's code)."""
    by_code = {n.code: n.id for n in onto.nodes.values() if n.kind == pb.NODE_KIND_GENRE}
    blocked = onto.descendants(prefs.blocked_genres)
    licensed = set(onto.out(E.EDGE_KIND_LICENSES, ctx.region)) or set(by_code.values())
    ceiling = min([onto.nodes[r].code for r in onto.out(E.EDGE_KIND_MAX_RATING, ctx.region)]
                  + ([onto.nodes[ctx.max_rating].code] if ctx.max_rating else []))
    formats = {onto.nodes[f].code for f in onto.into(E.EDGE_KIND_COMPATIBLE_WITH, ctx.device)}
    region_bit = onto.nodes[ctx.region].code
    out = []
    for row in range(len(cat)):
        genres = {by_code[int(g)] for g in cat.genre_ids[row] if g >= 0}
        item_formats = {b for b in range(8) if int(cat.format_mask[row]) >> b & 1}
        out.append(not genres & blocked and genres <= licensed and int(cat.rating[row]) <= ceiling
                   and int(cat.region_mask[row]) >> region_bit & 1 == 1 and bool(item_formats & formats))
    return np.array(out)


CASES = [
    (c.RequestContext(surface=1, region="US", device="smart_tv"), c.UserPreferences(blocked_genres=["drama", "horror"])),
    (c.RequestContext(surface=2, region="IN", device="legacy_stb", max_rating="IN:UA"), c.UserPreferences()),
    (c.RequestContext(surface=3, region="JP", device="web_browser"), c.UserPreferences(blocked_genres=["anime"])),
    (c.RequestContext(surface=1, region="DE", device="ios_phone", max_rating="DE:FSK12"),
     c.UserPreferences(blocked_genres=["comedy"])),
]


@pytest.mark.parametrize("ctx, prefs", CASES)
def test_shard_returns_only_permitted_items(world, ctx, prefs) -> None:
    onto, cat, store = world
    flt = compile_filter(onto, ctx, prefs)
    allow = evaluate_filter(columns_from_catalogue(cat), flt)
    truth = permitted_rows(onto, cat, ctx, prefs)
    assert np.array_equal(allow, truth)  # the whole allowed set, not just the top-k
    assert 0 < truth.sum() < len(cat)
    res = store.search(generate_queries(cat, 8), 20, flt)
    returned = res.rows[res.rows >= 0]
    assert returned.size > 0 and truth[returned].all()
