"""The attribute columns stored beside each row's vector: their schema, validation of what a writer sends,
conversion from and to ``MediaAttributes``, and row copies between column sets.

The "datagen adapter" (:func:`columns_from_catalogue`) reads a ``gmco_common.datagen`` catalogue or any
bulk import in the same column layout.
"""

from __future__ import annotations

import itertools
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

    @property
    def names(self) -> list[str]:
        return [f.name for f in fields(self)]

    def head(self, n: int) -> AttributeColumns:
        return AttributeColumns(**{name: getattr(self, name)[:n] for name in self.names})

    def take(self, rows: np.ndarray) -> AttributeColumns:
        return AttributeColumns(**{name: getattr(self, name)[rows] for name in self.names})

    @property
    def nbytes(self) -> int:
        return sum(getattr(self, name).nbytes for name in self.names)


# Bytes of attribute columns per row (what the memory budget counts beside the FP16 vectors).
ROW_BYTES = 8 + 4 * MAX_GENRES + 1 + 8 + 8 + 2 + 4


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


def copy_rows(dst: AttributeColumns, dst_start: int, src: AttributeColumns, rows: np.ndarray | slice) -> int:
    """Copy ``src``'s ``rows`` into ``dst`` from ``dst_start``; returns how many rows were copied."""
    count = 0
    for name in dst.names:
        part = getattr(src, name)[rows]
        count = part.shape[0]
        getattr(dst, name)[dst_start:dst_start + count] = part
    return count


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


def columns_from_attributes(media_ids: np.ndarray, attrs: Sequence[common_pb2.MediaAttributes]
                            ) -> tuple[AttributeColumns, np.ndarray]:
    """Columns for ``attrs`` (decoded messages, one per id), built a column at a time, and a mask of the rows
    that :func:`check_attributes` would reject; those rows' columns hold no meaningful values. The rows
    that pass get exactly what :func:`write_attributes` writes."""
    n = len(attrs)
    cols = empty_columns(n)
    cols.media_ids[:] = media_ids
    rating = np.fromiter((a.rating for a in attrs), np.uint32, n)
    year = np.fromiter((a.release_year for a in attrs), np.uint32, n)
    cols.popularity[:] = np.fromiter((a.popularity for a in attrs), np.float32, n)
    cols.region_mask[:] = np.fromiter((a.region_mask for a in attrs), np.uint64, n)
    cols.format_mask[:] = np.fromiter((a.format_mask for a in attrs), np.uint64, n)
    genres = [a.genre_ids for a in attrs]
    counts = np.fromiter(map(len, genres), np.int64, n)
    flat = np.fromiter(itertools.chain.from_iterable(genres), np.int64, int(counts.sum()))
    row = np.repeat(np.arange(n), counts)
    col = np.arange(flat.shape[0]) - np.repeat(np.cumsum(counts) - counts, counts)
    bad = (counts > MAX_GENRES) | (rating > 255) | (year > 9999) | ~np.isfinite(cols.popularity) \
        | (cols.popularity < 0)
    bad[row[flat > MAX_GENRE_ID]] = True
    fits = col < MAX_GENRES
    cols.genre_ids[row[fits], col[fits]] = np.where(flat[fits] > MAX_GENRE_ID, -1, flat[fits]).astype(np.int32)
    cols.rating[:] = np.minimum(rating, 255)
    cols.release_year[:] = np.minimum(year, np.iinfo(np.uint16).max)
    return cols, bad


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
