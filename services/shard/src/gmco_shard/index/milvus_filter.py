"""The shard's ``Filter`` as a Milvus boolean expression, and the attribute columns as Milvus rows.

Milvus expressions have no bitwise operators, so the region and format masks are stored as arrays of
their set bit positions: ``(item.mask & f.mask) != 0`` becomes ``array_contains_any(bits, [f's bits])``.
Media ids are uint64 in the shard and INT64 in Milvus: they are stored reinterpreted as two's complement
(the same 64 bits), and excluded ids are translated the same way. Clause for clause the expression has
the semantics of :func:`gmco_shard.filters.evaluate_filter` (a property test checks it on random filters).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy as np
from gmco.common.v1 import common_pb2

from gmco_shard.columns import AttributeColumns
from gmco_shard.filters import is_trivial

# Field names of the collection (see MilvusIndex for the schema).
ROW, MEDIA_ID, VECTOR = "row", "media_id", "vector"
GENRES, RATING, REGION_BITS, FORMAT_BITS, YEAR = "genre_ids", "rating", "region_bits", "format_bits", "release_year"
MASK_BITS = 64
NOTHING = f"{ROW} < 0"  # matches no row: rows are numbered from 0
_INT32_MAX = 2**31 - 1


def bit_positions(mask: int) -> list[int]:
    return [b for b in range(MASK_BITS) if mask >> b & 1]


def as_int64(ids: Iterable[int]) -> list[int]:
    """uint64 media ids as the signed INT64 values Milvus stores (same bits)."""
    return np.asarray(list(ids), np.uint64).view(np.int64).tolist()


def _ints(values: Iterable[int]) -> str:
    return "[" + ", ".join(str(int(v)) for v in values) + "]"


def filter_expression(f: common_pb2.Filter | None, hidden_rows: np.ndarray | None = None) -> str:
    """A Milvus boolean expression true exactly for the rows that pass ``f`` and are not ``hidden_rows``.

    An empty string means "no restriction".
    """
    clauses: list[str] = []
    if not is_trivial(f):
        assert f is not None
        # Genre columns are INT32: codes beyond that range match nothing.
        allowed = [g for g in f.allowed_genre_ids if g <= _INT32_MAX]
        if f.allowed_genre_ids:
            if not allowed:
                return NOTHING
            clauses.append(f"array_contains_any({GENRES}, {_ints(allowed)})")
        blocked = [g for g in f.blocked_genre_ids if g <= _INT32_MAX]
        if blocked:
            clauses.append(f"not array_contains_any({GENRES}, {_ints(blocked)})")
        if f.HasField("max_rating"):
            clauses.append(f"{RATING} <= {min(f.max_rating, _INT32_MAX)}")
        if f.region_mask:
            clauses.append(f"array_contains_any({REGION_BITS}, {_ints(bit_positions(f.region_mask))})")
        if f.format_mask:
            clauses.append(f"array_contains_any({FORMAT_BITS}, {_ints(bit_positions(f.format_mask))})")
        if f.min_release_year:
            if f.min_release_year > _INT32_MAX:
                return NOTHING
            clauses.append(f"{YEAR} >= {f.min_release_year}")
        if f.max_release_year:
            clauses.append(f"{YEAR} <= {min(f.max_release_year, _INT32_MAX)}")
        if f.excluded_media_ids:
            clauses.append(f"{MEDIA_ID} not in {_ints(as_int64(f.excluded_media_ids))}")
    if hidden_rows is not None and hidden_rows.size:
        clauses.append(f"{ROW} not in {_ints(hidden_rows)}")
    return " and ".join(f"({c})" for c in clauses)


def rows_expression(allow: np.ndarray) -> str:
    """An expression for an allow mask over rows ``0..len(allow)-1``: the shorter of an in/not-in list."""
    allowed = np.flatnonzero(allow)
    if allowed.size == allow.size:
        return ""
    if allowed.size == 0:
        return NOTHING
    if allowed.size <= allow.size // 2:
        return f"{ROW} in {_ints(allowed)}"
    return f"{ROW} not in {_ints(np.flatnonzero(~allow))}"


def entity_rows(vectors: np.ndarray, cols: AttributeColumns, start: int, dtype: np.dtype) -> list[dict[str, Any]]:
    """Milvus entities for ``vectors`` (rows ``start..``) and the matching slice of ``cols``."""
    ids = cols.media_ids.view(np.int64)
    out = []
    for i in range(vectors.shape[0]):
        genres = cols.genre_ids[i]
        out.append({
            ROW: start + i,
            MEDIA_ID: int(ids[i]),
            VECTOR: np.asarray(vectors[i], dtype=dtype),
            GENRES: genres[genres >= 0].tolist(),
            RATING: int(cols.rating[i]),
            REGION_BITS: bit_positions(int(cols.region_mask[i])),
            FORMAT_BITS: bit_positions(int(cols.format_mask[i])),
            YEAR: int(cols.release_year[i]),
        })
    return out

