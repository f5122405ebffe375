"""Bulk loading of catalogue items into the catalogue log: readers, row validation, batching, resume.

``gmco import`` (:mod:`gmco_cli.import_`) is the command; this module is what it runs, usable from Python.

Inputs, one or more files, each one of:

- **Parquet** (``.parquet``/``.pq``): an id column, a vector column (a list or fixed-size list of floats, or
  ``binary`` holding little-endian FP16 bytes) and optional attribute columns;
- **NPY + JSON Lines**: ``items.npy`` (an ``(n, dim)`` float array) beside ``items.jsonl`` with the same stem,
  whose line ``i`` carries row ``i``'s id and attributes;
- **JSON Lines** (``.jsonl``/``.ndjson``) alone: every line holds the id, the vector and the attributes.

Column (or key) names are mapped by :class:`Columns`; the attributes are those of ``MediaAttributes``:
``genre_ids`` (a list of ints), ``rating``, ``region_mask``, ``format_mask``, ``release_year`` and
``popularity``; an absent column or a null value is 0 (an empty list for the genres).

Every row is validated before its batch is appended: an id in 0..2^64-1, a vector of exactly ``dim``
finite values that fit FP16, attributes in range. A bad row stops the import with its file and row number
(:class:`RowError`), and nothing of its batch is appended. Each batch is one transaction of the log
(``CatalogLog.append``), so it is all there or not at all; its ``request_id`` is derived from the run, the
file and the batch's rows, so a batch that was committed just before an interruption is not appended twice.

Resume. A state file records, per input file, how many rows are committed; a second run with the same
state file skips them (reading only their ids, for the duplicate check) and goes on from there.
"""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import json
import os
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from gmco.common.v1 import common_pb2

FP16_MAX = 65504.0
ATTRIBUTES = ("genre_ids", "rating", "region_mask", "format_mask", "release_year", "popularity")
_U32 = (1 << 32) - 1
_U64 = (1 << 64) - 1
_RANGES: dict[str, tuple[int, int]] = {
    "rating": (0, _U32), "region_mask": (0, _U64), "format_mask": (0, _U64), "release_year": (0, 9999),
}


class RowError(ValueError):
    """A row that cannot be imported: where it is and what is wrong with it."""

    def __init__(self, path: Path | str, row: int, field: str, reason: str) -> None:
        self.path, self.row, self.field, self.reason = str(path), row, field, reason
        super().__init__(f"{path}: row {row}: {field}: {reason}")


@dataclass(frozen=True)
class Columns:
    """Where each value is in the input: the id, the vector and each attribute's column (or JSON key)."""

    id: str = "media_id"
    vector: str = "vector"
    attributes: dict[str, str] = field(default_factory=lambda: {a: a for a in ATTRIBUTES})


@dataclass
class Chunk:
    """Rows ``first_row .. first_row + len(ids) - 1`` (1-based) of one file, already validated."""

    path: Path
    first_row: int
    ids: np.ndarray  # uint64
    vectors: np.ndarray | None  # float16 (n, dim); None for rows skipped on resume
    attributes: list[bytes] | None  # MediaAttributes bytes per row
    lines: list[int] | None = None  # each row's position as errors name it (JSON Lines: its line number)

    def position(self, i: int) -> int:
        return self.lines[i] if self.lines is not None else self.first_row + i


# -- readers -----------------------------------------------------------------------------------------------

def kind_of(path: Path) -> str:
    suffix = path.suffix.lower()
    if suffix in (".parquet", ".pq"):
        return "parquet"
    if suffix == ".npy":
        return "npy"
    if suffix in (".jsonl", ".ndjson", ".json"):
        return "jsonl"
    raise ValueError(f"{path}: unknown format (use .parquet, .npy with a .jsonl beside it, or .jsonl)")


def count_rows(path: Path) -> int:
    kind = kind_of(path)
    if kind == "parquet":
        import pyarrow.parquet as pq

        return pq.ParquetFile(path).metadata.num_rows
    if kind == "npy":
        return int(np.load(path, mmap_mode="r").shape[0])
    with path.open("rb") as f:
        return sum(1 for line in f if line.strip())


def _vectors_to_fp16(path: Path, first_row: int, values: np.ndarray, dim: int, what: str) -> np.ndarray:
    """(n, dim) values as FP16, after checking they are finite and in FP16's range."""
    if values.ndim != 2 or values.shape[1] != dim:
        raise RowError(path, first_row, what, f"has dimension {values.shape[-1] if values.ndim else 0}, "
                                              f"expected {dim}")
    if values.dtype != np.float16:
        bad = ~np.isfinite(values).all(axis=1) | (np.abs(values) > FP16_MAX).any(axis=1)
        if bad.any():
            i = int(np.argmax(bad))
            raise RowError(path, first_row + i, what, "holds NaN, Inf or a value beyond FP16's range (65504)")
        return values.astype(np.float16)
    # NaN and Inf are the FP16 values whose exponent bits are all set; testing the bits skips a float conversion.
    values = np.ascontiguousarray(values)
    bad = (values.view(np.uint16) & 0x7FFF).max(axis=1) >= 0x7C00
    if bad.any():
        raise RowError(path, first_row + int(np.argmax(bad)), what, "holds NaN or Inf")
    return values


def _check_ids(path: Path, first_row: int, raw: Sequence[Any], what: str) -> np.ndarray:
    out = np.empty(len(raw), dtype=np.uint64)
    for i, value in enumerate(raw):
        if value is None or isinstance(value, bool) or not isinstance(value, int | np.integer):
            if isinstance(value, float) and value.is_integer():
                value = int(value)
            else:
                raise RowError(path, first_row + i, what, f"{value!r} is not an integer id")
        if not 0 <= int(value) <= _U64:
            raise RowError(path, first_row + i, what, f"{value} is outside 0..2^64-1")
        out[i] = int(value)
    return out


def encode_attributes(path: Path, first_row: int, columns: dict[str, Sequence[Any]], n: int,
                      names: dict[str, str]) -> list[bytes]:
    """MediaAttributes bytes for each of ``n`` rows; ``columns`` maps an attribute to its values (or absent)."""
    out: list[bytes] = []
    get = {a: columns.get(a) for a in ATTRIBUTES}
    for i in range(n):
        values: dict[str, Any] = {}
        for attr in ATTRIBUTES:
            col = get[attr]
            value = None if col is None else col[i]
            if value is None:
                continue
            where = names.get(attr, attr)
            if attr == "genre_ids":
                if not isinstance(value, list | tuple | np.ndarray) or any(
                        isinstance(g, bool) or not isinstance(g, int | np.integer) or not 0 <= g <= _U32
                        for g in value):
                    raise RowError(path, first_row + i, where, f"{_short(value)} is not a list of genre codes "
                                                               "(0..2^32-1)")
                values[attr] = [int(g) for g in value]
            elif attr == "popularity":
                if isinstance(value, bool) or not isinstance(value, int | float | np.number) \
                        or not np.isfinite(value) or value < 0:
                    raise RowError(path, first_row + i, where, f"{_short(value)} is not a finite number >= 0")
                values[attr] = float(value)
            else:
                low, high = _RANGES[attr]
                if isinstance(value, float) and value.is_integer():
                    value = int(value)
                if isinstance(value, bool) or not isinstance(value, int | np.integer) or not low <= value <= high:
                    raise RowError(path, first_row + i, where, f"{_short(value)} is not an integer in "
                                                               f"{low}..{high if high < 10**6 else 'max'}")
                values[attr] = int(value)
        out.append(common_pb2.MediaAttributes(**values).SerializeToString(deterministic=True))
    return out


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def read_parquet(path: Path, dim: int, columns: Columns, batch_rows: int, skip_rows: int) -> Iterator[Chunk]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    source = pq.ParquetFile(path, memory_map=True)
    names = set(source.schema_arrow.names)
    for needed in (columns.id, columns.vector):
        if needed not in names:
            raise RowError(path, 0, needed, f"no such column (columns: {', '.join(sorted(names))})")
    attrs = {a: c for a, c in columns.attributes.items() if c in names}
    wanted = [columns.id, columns.vector, *attrs.values()]
    first = 1
    # One thread: on a busy 2-core machine pyarrow's own thread pool made reading 7x slower (2.25 s vs 0.32 s
    # for 100k x 1024 FP16 rows); memory-mapped, 0.16 s.
    for batch in source.iter_batches(batch_size=batch_rows, columns=wanted, use_threads=False):
        n = batch.num_rows
        ids_col = batch.column(columns.id)
        if ids_col.null_count:
            raise RowError(path, first + _first_null(ids_col), columns.id, "is null")
        if pa.types.is_integer(ids_col.type):
            ids = _values(ids_col)
            if ids.dtype.kind == "i" and (ids < 0).any():
                i = int(np.argmax(ids < 0))
                raise RowError(path, first + i, columns.id, f"{ids[i]} is outside 0..2^64-1")
            ids = ids.astype(np.uint64)
        else:
            ids = _check_ids(path, first, ids_col.to_pylist(), columns.id)
        if first + n - 1 <= skip_rows:
            yield Chunk(path, first, ids, None, None)
            first += n
            continue
        vectors = _parquet_vectors(path, first, batch.column(columns.vector), dim, columns.vector)
        yield Chunk(path, first, ids, vectors, _parquet_attributes(path, first, batch, attrs))
        first += n


def _parquet_attributes(path: Path, first: int, batch: Any, attrs: dict[str, str]) -> list[bytes]:
    """MediaAttributes bytes per row of a record batch, validated and encoded column by column (vectorised)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    n = batch.num_rows
    ints: dict[str, np.ndarray] = {}
    popularity: np.ndarray | None = None
    genres: tuple[np.ndarray, np.ndarray] | None = None
    for attr, name in attrs.items():
        column = batch.column(name)
        if attr == "genre_ids":
            if not (pa.types.is_list(column.type) or pa.types.is_large_list(column.type)) \
                    or not pa.types.is_integer(column.type.value_type):
                raise RowError(path, first, name, f"type {column.type} is not a list of integer genre codes")
            lengths = _values(pc.list_value_length(column), fill=0).astype(np.int64)
            offsets = np.concatenate([[0], np.cumsum(lengths)])
            flat = _values(column.flatten().cast(pa.int64(), safe=False), fill=-1)
            bad = (flat < 0) | (flat > _U32)
            if bad.any():
                row = int(np.searchsorted(offsets, int(np.argmax(bad)), side="right")) - 1
                raise RowError(path, first + row, name, "holds a genre code outside 0..2^32-1 (or a null)")
            genres = lengths, flat.astype(np.uint64)
            continue
        if attr == "popularity":
            if not (pa.types.is_floating(column.type) or pa.types.is_integer(column.type)):
                raise RowError(path, first, name, f"type {column.type} is not a number")
            arr = _values(column, fill=0).astype(np.float64)
            bad = ~np.isfinite(arr) | (arr < 0)
            if bad.any():
                i = int(np.argmax(bad))
                raise RowError(path, first + i, name, f"{arr[i]!r} is not a finite number >= 0")
            with np.errstate(over="ignore"):  # beyond FP32's range becomes inf, as protobuf's float field does
                popularity = arr.astype(np.float32)
            continue
        if not pa.types.is_integer(column.type):
            raise RowError(path, first, name, f"type {column.type} is not an integer type")
        low, high = _RANGES[attr]
        arr = _values(column, fill=0)
        bad = np.zeros(n, dtype=bool)
        if arr.dtype.kind == "i":
            bad |= arr < low
        if high < np.iinfo(arr.dtype).max:
            bad |= arr > high
        if bad.any():
            i = int(np.argmax(bad))
            raise RowError(path, first + i, name, f"{arr[i]} is not an integer in "
                                                  f"{low}..{high if high < 10**6 else 'max'}")
        ints[attr] = arr.astype(np.uint64)
    return encode_attribute_columns(n, ints, popularity, genres)


# Field numbers of MediaAttributes' scalar fields (all varints; popularity is field 6, a fixed32 float).
_VARINT_FIELDS = {"rating": 2, "region_mask": 3, "format_mask": 4, "release_year": 5}
_VARINT_LIMITS = np.array([1 << (7 * k) for k in range(1, 10)], dtype=np.uint64)


def _varint_sizes(values: np.ndarray) -> np.ndarray:
    return np.searchsorted(_VARINT_LIMITS, values, side="right").astype(np.int64) + 1


def _put_varints(out: np.ndarray, at: np.ndarray, values: np.ndarray, sizes: np.ndarray) -> None:
    """Write ``values`` as base-128 varints of ``sizes`` bytes at byte positions ``at`` of ``out``."""
    for k in range(int(sizes.max(initial=0))):
        more = sizes > k
        byte = (values[more] >> np.uint64(7 * k)) & np.uint64(0x7F)
        byte |= np.where(sizes[more] > k + 1, np.uint64(0x80), np.uint64(0))
        out[at[more] + k] = byte.astype(np.uint8)


def encode_attribute_columns(n: int, ints: dict[str, np.ndarray], popularity: np.ndarray | None,
                             genres: tuple[np.ndarray, np.ndarray] | None) -> list[bytes]:
    """MediaAttributes bytes for ``n`` rows given as columns (absent ones are 0), exactly what
    ``MediaAttributes(...).SerializeToString(deterministic=True)`` gives, built with numpy instead of one
    message per row: fields in number order, values equal to the default left out, genre codes packed.

    ``ints`` maps rating, region_mask, format_mask and release_year to uint64 arrays; ``popularity`` is
    float32; ``genres`` is (codes per row, the codes of every row one after another, uint64)."""
    sizes = np.zeros(n, np.int64)  # bytes per row
    if genres is not None:
        counts, codes = genres
        code_sizes = _varint_sizes(codes)
        row_of_code = np.repeat(np.arange(n), counts)
        payload = np.bincount(row_of_code, weights=code_sizes, minlength=n).astype(np.int64)
        has_genres = counts > 0
        sizes += np.where(has_genres, 1 + _varint_sizes(payload.astype(np.uint64)) + payload, 0)
    fields = []
    for attr, number in _VARINT_FIELDS.items():
        if attr in ints:
            values = ints[attr]
            present = values != 0
            value_sizes = _varint_sizes(values)
            sizes += np.where(present, 1 + value_sizes, 0)
            fields.append((number, values, present, value_sizes))
    if popularity is not None:
        bits = np.ascontiguousarray(popularity, dtype="<f4").view(np.uint32)
        pop_present = bits != 0  # -0.0 is written, as protobuf does: only an all-zero value is the default
        sizes += np.where(pop_present, 5, 0)
    ends = np.cumsum(sizes)
    out = np.zeros(int(ends[-1]) if n else 0, np.uint8)
    cursor = ends - sizes  # where each row's next field goes
    if genres is not None and has_genres.any():
        rows = np.flatnonzero(has_genres)
        out[cursor[rows]] = 0x0A  # field 1, length-delimited
        length_sizes = _varint_sizes(payload[rows].astype(np.uint64))
        _put_varints(out, cursor[rows] + 1, payload[rows].astype(np.uint64), length_sizes)
        cursor[rows] += 1 + length_sizes
        # each code at its row's start plus the sizes of the codes before it in the row
        before = np.cumsum(code_sizes) - code_sizes
        row_start = np.repeat(cursor - (np.cumsum(payload) - payload), counts)
        _put_varints(out, row_start + before, codes, code_sizes)
        cursor[rows] += payload[rows]
    for number, values, present, value_sizes in fields:
        rows = np.flatnonzero(present)
        out[cursor[rows]] = number << 3  # wire type 0, varint
        _put_varints(out, cursor[rows] + 1, values[rows], value_sizes[rows])
        cursor[rows] += 1 + value_sizes[rows]
    if popularity is not None:
        rows = np.flatnonzero(pop_present)
        out[cursor[rows]] = (6 << 3) | 5  # wire type 5, fixed32
        out[cursor[rows][:, None] + np.arange(1, 5)] = bits[rows].astype("<u4").view(np.uint8).reshape(-1, 4)
    blob = out.tobytes()
    return [blob[a:b] for a, b in itertools.pairwise([0, *ends.tolist()])]


def _values(array: Any, fill: int | None = None) -> np.ndarray:
    """A pyarrow array of numbers as numpy, straight from its buffers (no copy without nulls); nulls become
    ``fill``. Not ``to_numpy`` or ``fill_null``: the first call of either imports pandas (1.7 s of CPU here,
    inside the import's clock)."""
    import pyarrow as pa

    kind = array.type
    if not (pa.types.is_integer(kind) or pa.types.is_floating(kind)):
        return array.fill_null(fill).to_numpy(zero_copy_only=False) if fill is not None and array.null_count \
            else array.to_numpy(zero_copy_only=False)
    dtype = np.dtype(f"<{'f' if pa.types.is_floating(kind) else 'i' if pa.types.is_signed_integer(kind) else 'u'}"
                     f"{kind.bit_width // 8}")
    n = len(array)
    if n == 0:
        return np.empty(0, dtype)
    validity, data = array.buffers()[:2]
    values = np.frombuffer(data, dtype, count=n, offset=array.offset * dtype.itemsize)
    if array.null_count:
        if fill is None:
            raise ValueError("the array holds nulls and no fill value was given")
        valid = np.unpackbits(np.frombuffer(validity, np.uint8), bitorder="little")[array.offset:array.offset + n]
        values = np.where(valid.astype(bool), values, np.asarray(fill).astype(dtype))
    return values


def _first_null(column: Any) -> int:
    return int(np.argmax(column.is_null().to_numpy(zero_copy_only=False)))


def _parquet_vectors(path: Path, first: int, column: Any, dim: int, what: str) -> np.ndarray:
    import pyarrow as pa

    if column.null_count:
        raise RowError(path, first + _first_null(column), what, "is null")
    kind = column.type
    if pa.types.is_fixed_size_binary(kind):
        if kind.byte_width != 2 * dim:
            raise RowError(path, first, what, f"has {kind.byte_width} bytes, expected {2 * dim} (FP16 x {dim})")
        data = np.frombuffer(column.buffers()[1], dtype=np.uint8)
        start = column.offset * kind.byte_width
        raw = data[start:start + len(column) * kind.byte_width]
        return _vectors_to_fp16(path, first, raw.view("<f2").reshape(-1, dim), dim, what)
    if pa.types.is_binary(kind) or pa.types.is_large_binary(kind):
        offsets = np.frombuffer(column.buffers()[1], dtype=np.int64 if pa.types.is_large_binary(kind) else np.int32)
        offsets = offsets[column.offset:column.offset + len(column) + 1]
        lengths = np.diff(offsets)
        if (lengths != 2 * dim).any():
            i = int(np.argmax(lengths != 2 * dim))
            raise RowError(path, first + i, what, f"has {lengths[i]} bytes, expected {2 * dim} (FP16 x {dim})")
        data = np.frombuffer(column.buffers()[2], dtype=np.uint8)[offsets[0]:offsets[-1]]
        return _vectors_to_fp16(path, first, data.view("<f2").reshape(-1, dim), dim, what)
    if pa.types.is_fixed_size_list(kind):
        if kind.list_size != dim:
            raise RowError(path, first, what, f"has dimension {kind.list_size}, expected {dim}")
        flat = column.flatten()
    elif pa.types.is_list(kind) or pa.types.is_large_list(kind):
        offsets = _values(column.offsets)
        lengths = np.diff(offsets)
        if (lengths != dim).any():
            i = int(np.argmax(lengths != dim))
            raise RowError(path, first + i, what, f"has dimension {lengths[i]}, expected {dim}")
        flat = column.flatten()
    else:
        raise RowError(path, first, what, f"type {kind} is not a list of floats or FP16 bytes")
    if flat.null_count:
        raise RowError(path, first + _first_null(flat) // dim, what, "holds a null value")
    values = _values(flat).reshape(-1, dim)
    if values.dtype.kind != "f":
        values = values.astype(np.float32)
    return _vectors_to_fp16(path, first, values, dim, what)


def _json_lines(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, object) for each non-empty line."""
    with path.open("rb") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                doc = json.loads(line)
            except ValueError as exc:
                raise RowError(path, number, "line", f"is not JSON ({exc.msg})") from None
            if not isinstance(doc, dict):
                raise RowError(path, number, "line", "is not a JSON object")
            yield number, doc


def _group(lines: Iterator[tuple[int, dict[str, Any]]], n: int) -> Iterator[list[tuple[int, dict[str, Any]]]]:
    batch: list[tuple[int, dict[str, Any]]] = []
    for item in lines:
        batch.append(item)
        if len(batch) == n:
            yield batch
            batch = []
    if batch:
        yield batch


def _docs_chunk(path: Path, rows: list[tuple[int, dict[str, Any]]], columns: Columns,
                vectors: np.ndarray | None, first_row: int, row_numbers: list[int]) -> Chunk:
    """A chunk from parsed JSON objects; errors name ``row_numbers`` (JSONL lines, or NPY rows)."""
    docs = [d for _, d in rows]
    for number, doc in zip(row_numbers, docs, strict=True):
        if columns.id not in doc:
            raise RowError(path, number, columns.id, "is missing")
    ids = np.empty(len(docs), dtype=np.uint64)
    for i, (number, doc) in enumerate(zip(row_numbers, docs, strict=True)):
        ids[i] = _check_ids(path, number, [doc[columns.id]], columns.id)[0]
    if vectors is None:
        return Chunk(path, first_row, ids, None, None, row_numbers)
    attrs: list[bytes] = []
    for number, doc in zip(row_numbers, docs, strict=True):
        present = {a: [doc.get(c)] for a, c in columns.attributes.items() if c in doc}
        attrs.extend(encode_attributes(path, number, present, 1, columns.attributes))
    return Chunk(path, first_row, ids, vectors, attrs, row_numbers)


def read_jsonl(path: Path, dim: int, columns: Columns, batch_rows: int, skip_rows: int) -> Iterator[Chunk]:
    row = 0
    for rows in _group(_json_lines(path), batch_rows):
        first = row + 1
        row += len(rows)
        numbers = [n for n, _ in rows]
        if row <= skip_rows:
            yield _docs_chunk(path, rows, columns, None, first, numbers)
            continue
        vectors = np.empty((len(rows), dim), dtype=np.float32)
        for i, (number, doc) in enumerate(rows):
            value = doc.get(columns.vector)
            if not isinstance(value, list):
                raise RowError(path, number, columns.vector, "is missing or not a list of numbers")
            if len(value) != dim:
                raise RowError(path, number, columns.vector, f"has dimension {len(value)}, expected {dim}")
            try:
                vectors[i] = value
            except (TypeError, ValueError):
                raise RowError(path, number, columns.vector, "holds a value that is not a number") from None
        try:
            fp16 = _vectors_to_fp16(path, 1, vectors, dim, columns.vector)
        except RowError as exc:  # name the line, not the position in the batch
            raise RowError(path, numbers[exc.row - 1], exc.field, exc.reason) from None
        yield _docs_chunk(path, rows, columns, fp16, first, numbers)


def read_npy(path: Path, dim: int, columns: Columns, batch_rows: int, skip_rows: int) -> Iterator[Chunk]:
    side = path.with_suffix(".jsonl")
    if not side.exists():
        raise RowError(path, 0, "file", f"needs {side.name} beside it (ids and attributes, one line per row)")
    array = np.load(path, mmap_mode="r")
    if array.ndim != 2 or array.shape[1] != dim:
        raise RowError(path, 1, "vector", f"the array's shape is {array.shape}, expected (n, {dim})")
    if array.dtype.kind != "f":
        raise RowError(path, 1, "vector", f"dtype {array.dtype} is not a float type")
    lines = _json_lines(side)
    start = 0
    for rows in _group(lines, batch_rows):
        end = start + len(rows)
        if end > array.shape[0]:
            raise RowError(side, rows[array.shape[0] - start][0] if array.shape[0] > start else rows[0][0],
                           "line", f"has no vector: {path.name} holds {array.shape[0]} rows")
        lines = [n for n, _ in rows]
        if end <= skip_rows:
            yield _docs_chunk(side, rows, columns, None, start + 1, lines)
        else:
            vectors = _vectors_to_fp16(path, start + 1, np.asarray(array[start:end]), dim, columns.vector)
            yield _docs_chunk(side, rows, columns, vectors, start + 1, lines)
        start = end
    if start != array.shape[0]:
        raise RowError(path, start + 1, "vector", f"has no line in {side.name} ({side.name} ends at row {start})")


READERS: dict[str, Callable[..., Iterator[Chunk]]] = {"parquet": read_parquet, "npy": read_npy,
                                                      "jsonl": read_jsonl}


# -- resume state ------------------------------------------------------------------------------------------

@dataclass
class State:
    """What a run has committed: per file, the rows done. Written atomically after each batch."""

    path: Path | None
    run_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    files: dict[str, dict[str, int]] = field(default_factory=dict)
    last_lsn: int = 0

    @classmethod
    def load(cls, path: Path | None) -> State:
        if path is None or not path.exists():
            return cls(path)
        doc = json.loads(path.read_text())
        return cls(path, doc["run_id"], doc.get("files", {}), int(doc.get("last_lsn", 0)))

    @staticmethod
    def fingerprint(file: Path) -> dict[str, int]:
        stat = file.stat()
        return {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns}

    def rows_done(self, file: Path) -> int:
        entry = self.files.get(str(file.resolve()))
        if entry is None or {k: entry.get(k) for k in ("size", "mtime_ns")} != self.fingerprint(file):
            return 0  # a file that changed since is imported again from its start
        return int(entry.get("rows_done", 0))

    def done(self, file: Path, rows: int, lsn: int) -> None:
        self.files[str(file.resolve())] = {**self.fingerprint(file), "rows_done": rows}
        self.last_lsn = max(self.last_lsn, lsn)
        if self.path is not None:
            tmp = self.path.with_name(self.path.name + ".tmp")
            tmp.write_text(json.dumps({"run_id": self.run_id, "files": self.files, "last_lsn": self.last_lsn}))
            os.replace(tmp, self.path)


# -- the import --------------------------------------------------------------------------------------------

@dataclass
class Report:
    files: int = 0
    rows: int = 0
    appended: int = 0
    skipped: int = 0  # committed by an earlier run (resume)
    batches: int = 0
    last_lsn: int = 0
    seconds: float = 0.0
    caught_up_seconds: float | None = None

    @property
    def items_per_second(self) -> float:
        return self.appended / self.seconds if self.seconds else 0.0


class Duplicates:
    """Ids seen in this run, with where each was first seen, for the duplicate check across files."""

    def __init__(self, policy: str) -> None:
        self.policy = policy
        self._files: list[str] = []
        self._seen: dict[int, int] = {}

    def check(self, chunk: Chunk) -> None:
        if self.policy == "last-wins":
            return
        if str(chunk.path) not in self._files:
            self._files.append(str(chunk.path))
        file_index = self._files.index(str(chunk.path))
        seen = self._seen
        for i, media_id in enumerate(chunk.ids.tolist()):
            where = seen.get(media_id)
            if where is not None:
                other = f"{self._files[where >> 40]} row {where & ((1 << 40) - 1)}"
                raise RowError(chunk.path, chunk.position(i), "media_id", f"duplicate id {media_id} (first at {other}); "
                                                                   "pass --duplicates last-wins to keep the last")
            seen[media_id] = (file_index << 40) | chunk.position(i)


def request_id(run_id: str, file: Path, chunk: Chunk) -> str:
    """The batch's idempotency key: the run, the file as it is now (size, mtime), the batch's position and its
    ids. A rerun of the same run over the unchanged file draws the same keys, so the log takes a batch
    committed just before an interruption only once; hashing the ids, not the 2 KB vectors, keeps it cheap."""
    stat = file.stat()
    digest = hashlib.blake2b(f"{run_id}\0{file.resolve()}\0{stat.st_size}\0{stat.st_mtime_ns}\0"
                             f"{chunk.first_row}\0{len(chunk.ids)}".encode(), digest_size=16)
    digest.update(chunk.ids.tobytes())
    return f"gmco-import:{digest.hexdigest()}"


def writes_of(chunk: Chunk) -> Any:
    """The chunk as one columnar batch of upserts (``gmco_catalog.log.Upserts``): no object per row."""
    from gmco_catalog.log import Upserts

    assert chunk.vectors is not None and chunk.attributes is not None
    return Upserts(chunk.ids, np.ascontiguousarray(chunk.vectors, dtype="<f2"), chunk.attributes)


async def import_files(files: Sequence[Path], dsn: str, dim: int, columns: Columns | None = None, *,
                       batch_rows: int = 5000, state_path: Path | None = None, duplicates: str = "error",
                       progress: Callable[[int], None] | None = None,
                       after_batch: Callable[[Report], None] | None = None) -> Report:
    """Validate and append every row of ``files`` to the catalogue log at ``dsn``. Raises RowError on a bad row
    (its batch is not appended; earlier batches are, and are recorded in the state file for a resume)."""
    from gmco_catalog import open_log

    columns = columns or Columns()
    for file in files:
        kind_of(file)
        if not file.exists():
            raise FileNotFoundError(f"{file}: no such file")
    if any(kind_of(f) == "parquet" for f in files):
        import pyarrow.compute  # loaded before the clock starts: it takes a second or so
        import pyarrow.parquet  # noqa: F401
    state = State.load(state_path)
    dups = Duplicates(duplicates)
    report = Report(files=len(files))
    async with open_log(dsn) as log:  # type: ignore[attr-defined]
        started = time.perf_counter()  # the rate is the import's own, from the first row read to the last commit
        pending: asyncio.Task | None = None
        pending_done: tuple[Path, int, int] | None = None

        async def settle() -> None:
            nonlocal pending, pending_done
            if pending is None:
                return
            result = await pending
            assert pending_done is not None
            file, rows_done, n = pending_done
            if result.duplicate:  # committed just before an interruption; the log kept the first copy
                report.skipped += n
            else:
                report.appended += n
            report.batches += 1
            report.last_lsn = max(report.last_lsn, result.last_lsn)
            state.done(file, rows_done, result.last_lsn)
            if after_batch is not None:
                after_batch(report)
            pending, pending_done = None, None

        for file in files:
            skip = state.rows_done(file)
            reader = READERS[kind_of(file)](file, dim, columns, batch_rows, skip)
            while True:
                # Read and validate the next batch while the previous one commits.
                chunk = await asyncio.to_thread(next, reader, None)
                if chunk is None:
                    break
                n = len(chunk.ids)
                report.rows += n
                dups.check(chunk)
                if chunk.vectors is None:
                    report.skipped += n
                    if progress:
                        progress(n)
                    continue
                writes, rid = await asyncio.to_thread(lambda c=chunk, f=file: (writes_of(c),
                                                                              request_id(state.run_id, f, c)))
                await settle()
                pending = asyncio.ensure_future(log.append(writes, rid))
                pending_done = (file, chunk.first_row + n - 1, n)
                if progress:
                    progress(n)
        await settle()
        if report.last_lsn == 0:
            report.last_lsn = state.last_lsn
    report.seconds = time.perf_counter() - started
    return report


async def wait_caught_up(targets: Sequence[str], lsn: int, timeout: float,
                         progress: Callable[[int], None] | None = None) -> float:
    """Seconds until every shard replica at ``targets`` reports ``applied_lsn >= lsn``; TimeoutError after
    ``timeout``."""
    import grpc
    from gmco.shard.v1 import shard_service_pb2, shard_service_pb2_grpc

    started = time.perf_counter()
    channels = [grpc.aio.insecure_channel(t) for t in targets]
    try:
        stubs = [shard_service_pb2_grpc.ShardServiceStub(c) for c in channels]
        behind = set(range(len(targets)))
        while behind:
            for i in sorted(behind):
                try:
                    stats = await stubs[i].GetStats(shard_service_pb2.GetStatsRequest(), timeout=5)
                except grpc.aio.AioRpcError:
                    continue
                if stats.applied_lsn >= lsn:
                    behind.discard(i)
                    if progress:
                        progress(1)
            if behind:
                if time.perf_counter() - started > timeout:
                    raise TimeoutError(f"shard replicas {', '.join(targets[i] for i in sorted(behind))} had not "
                                       f"applied lsn {lsn} after {timeout:g} s")
                await asyncio.sleep(0.05)
    finally:
        for c in channels:
            await c.close()
    return time.perf_counter() - started
