"""The compiled ``Filter`` evaluated over attribute columns, vectorised, into an allow mask.

Semantics (see gmco.common.v1.Filter): an item passes when every populated clause holds —
any allowed genre, no blocked genre, rating <= max_rating, region and format bit intersections,
release-year range, and not excluded by id.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields

import numpy as np
from gmco.common.v1 import common_pb2
from gmco_common.errors import InvalidArgument

MAX_GENRES = 8  # genre ids kept per item
MAX_GENRE_ID = (1 << 31) - 1  # genre codes are stored as int32


@dataclass
class AttributeColumns:
    media_ids: np.ndarray  # uint64 (n,)
    genre_ids: np.ndarray  # int32 (n, MAX_GENRES), -1 padded
    rating: np.ndarray  # uint8
    region_mask: np.ndarray  # uint64
    format_mask: np.ndarray  # uint64
    release_year: np.ndarray  # uint16
    popularity: np.ndarray  # float32

    def __len__(self) -> int:
        return int(self.media_ids.shape[0])

    def head(self, n: int) -> AttributeColumns:
        return AttributeColumns(**{f.name: getattr(self, f.name)[:n] for f in fields(self)})

    def take(self, rows: np.ndarray) -> AttributeColumns:
        return AttributeColumns(**{f.name: getattr(self, f.name)[rows] for f in fields(self)})


def empty_columns(capacity: int) -> AttributeColumns:
    return AttributeColumns(
        media_ids=np.zeros(capacity, np.uint64),
        genre_ids=np.full((capacity, MAX_GENRES), -1, np.int32),
        rating=np.zeros(capacity, np.uint8),
        region_mask=np.zeros(capacity, np.uint64),
        format_mask=np.zeros(capacity, np.uint64),
        release_year=np.zeros(capacity, np.uint16),
        popularity=np.zeros(capacity, np.float32),
    )


def check_attributes(attrs: common_pb2.MediaAttributes, field: str) -> None:
    if len(attrs.genre_ids) > MAX_GENRES:
        raise InvalidArgument(f"{field}.genre_ids", f"has {len(attrs.genre_ids)} genres; at most {MAX_GENRES}")
    if any(g > MAX_GENRE_ID for g in attrs.genre_ids):
        raise InvalidArgument(f"{field}.genre_ids", f"genre codes are at most {MAX_GENRE_ID}")
    if attrs.rating > 255:
        raise InvalidArgument(f"{field}.rating", "must be a ladder level in 0..255")
    if attrs.release_year > 9999:
        raise InvalidArgument(f"{field}.release_year", "must be <= 9999")
    if not np.isfinite(attrs.popularity) or attrs.popularity < 0:
        raise InvalidArgument(f"{field}.popularity", "must be a finite number >= 0")


def write_attributes(cols: AttributeColumns, row: int, media_id: int, attrs: common_pb2.MediaAttributes) -> None:
    cols.media_ids[row] = media_id
    cols.genre_ids[row] = -1
    cols.genre_ids[row, : len(attrs.genre_ids)] = list(attrs.genre_ids)
    cols.rating[row] = attrs.rating
    cols.region_mask[row] = attrs.region_mask
    cols.format_mask[row] = attrs.format_mask
    cols.release_year[row] = attrs.release_year
    cols.popularity[row] = attrs.popularity


def read_attributes(cols: AttributeColumns, row: int) -> common_pb2.MediaAttributes:
    return common_pb2.MediaAttributes(
        genre_ids=[int(g) for g in cols.genre_ids[row] if g >= 0],
        rating=int(cols.rating[row]),
        region_mask=int(cols.region_mask[row]),
        format_mask=int(cols.format_mask[row]),
        release_year=int(cols.release_year[row]),
        popularity=float(cols.popularity[row]),
    )


def columns_from_items(items: Sequence[common_pb2.MediaItem]) -> AttributeColumns:
    """Columns for a list of MediaItem (for tests and cross-service checks)."""
    cols = empty_columns(len(items))
    for row, item in enumerate(items):
        write_attributes(cols, row, item.media_id, item.attributes)
    return cols


def columns_from_catalogue(cat, rows: np.ndarray | None = None) -> AttributeColumns:
    """Columns for rows of a :class:`gmco_common.datagen.Catalogue` (all rows by default)."""
    idx = np.arange(len(cat)) if rows is None else rows
    cols = empty_columns(len(idx))
    cols.media_ids[:] = cat.media_ids[idx]
    genres = np.asarray(cat.genre_ids[idx])
    cols.genre_ids[:, : min(genres.shape[1], MAX_GENRES)] = genres[:, :MAX_GENRES]
    cols.rating[:] = cat.rating[idx]
    cols.region_mask[:] = cat.region_mask[idx]
    cols.format_mask[:] = cat.format_mask[idx]
    cols.release_year[:] = cat.release_year[idx]
    cols.popularity[:] = cat.popularity[idx]
    return cols


def is_trivial(f: common_pb2.Filter | None) -> bool:
    return f is None or f.ByteSize() == 0


def evaluate_filter(cols: AttributeColumns, f: common_pb2.Filter | None) -> np.ndarray:
    """Boolean mask over the rows of ``cols``: True where the item passes ``f``."""
    n = len(cols)
    mask = np.ones(n, dtype=bool)
    if is_trivial(f):
        return mask
    assert f is not None
    if f.allowed_genre_ids:
        mask &= np.isin(cols.genre_ids, np.asarray(f.allowed_genre_ids, np.int64)).any(axis=1)
    if f.blocked_genre_ids:
        mask &= ~np.isin(cols.genre_ids, np.asarray(f.blocked_genre_ids, np.int64)).any(axis=1)
    if f.HasField("max_rating"):
        mask &= cols.rating <= f.max_rating
    if f.region_mask:
        mask &= (cols.region_mask & np.uint64(f.region_mask)) != 0
    if f.format_mask:
        mask &= (cols.format_mask & np.uint64(f.format_mask)) != 0
    if f.min_release_year:
        mask &= cols.release_year >= f.min_release_year
    if f.max_release_year:
        mask &= cols.release_year <= f.max_release_year
    if f.excluded_media_ids:
        mask &= ~np.isin(cols.media_ids, np.asarray(f.excluded_media_ids, np.uint64))
    return mask
