"""gmco import against a real SQLite catalogue log: what goes in is what the log holds, row for row."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner
from gmco.common.v1 import common_pb2
from gmco_catalog import open_log
from gmco_cli.import_ import import_

DIM = 8


def _items(n: int, start: int = 1, seed: int = 0) -> tuple[np.ndarray, np.ndarray, list[dict]]:
    rng = np.random.default_rng(seed)
    ids = np.arange(start, start + n, dtype=np.uint64)
    vectors = rng.standard_normal((n, DIM)).astype(np.float32)
    attrs = [{"genre_ids": [int(i % 5), 7], "rating": int(i % 4), "region_mask": 3, "format_mask": 1 << (i % 3),
              "release_year": 1990 + int(i % 30), "popularity": float(i % 11) / 10} for i in range(n)]
    return ids, vectors, attrs


def _parquet(path: Path, ids, vectors, attrs, vector_type: str = "list") -> Path:
    columns = {"media_id": pa.array(ids, pa.uint64())}
    if vector_type == "list":
        columns["vector"] = pa.array(vectors.tolist(), pa.list_(pa.float32()))
    elif vector_type == "fixed":
        columns["vector"] = pa.FixedSizeListArray.from_arrays(pa.array(vectors.ravel(), pa.float32()), DIM)
    else:
        columns["vector"] = pa.array([v.astype("<f2").tobytes() for v in vectors], pa.binary())
    for name in attrs[0]:
        columns[name] = pa.array([a[name] for a in attrs])
    pq.write_table(pa.table(columns), path)
    return path


def _log(dsn: Path) -> list:
    async def read():
        async with open_log(str(dsn)) as log:
            return (await log.read(0, None, 10**7)).entries
    return asyncio.run(read())


def _run(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(import_, [*args, "--quiet"], catch_exceptions=False)
    return result.exit_code, result.output


def _assert_round_trip(dsn: Path, ids, vectors, attrs) -> None:
    entries = _log(dsn)
    assert [e.media_id for e in entries] == [int(i) for i in ids]
    got = np.stack([np.frombuffer(e.vector, "<f2") for e in entries])
    np.testing.assert_array_equal(got, vectors.astype(np.float16))
    for entry, want in zip(entries, attrs, strict=True):
        parsed = common_pb2.MediaAttributes.FromString(entry.attributes)
        assert list(parsed.genre_ids) == want["genre_ids"] and parsed.rating == want["rating"]
        assert (parsed.region_mask, parsed.format_mask, parsed.release_year) == (
            want["region_mask"], want["format_mask"], want["release_year"])
        assert parsed.popularity == pytest.approx(want["popularity"])


@pytest.mark.parametrize("vector_type", ["list", "fixed", "fp16-bytes"])
def test_parquet_round_trip(tmp_path: Path, vector_type: str) -> None:
    ids, vectors, attrs = _items(1234)
    source = _parquet(tmp_path / "items.parquet", ids, vectors, attrs, vector_type)
    code, out = _run(str(source), "--catalog-dsn", str(tmp_path / "log.sqlite3"), "--dim", str(DIM),
                     "--batch-size", "500", "--state", str(tmp_path / "state.json"))
    assert code == 0, out
    assert "imported 1234 items" in out
    _assert_round_trip(tmp_path / "log.sqlite3", ids, vectors, attrs)


def test_npy_with_json_lines_round_trip_and_mapped_columns(tmp_path: Path) -> None:
    ids, vectors, attrs = _items(700, start=10**12)
    np.save(tmp_path / "items.npy", vectors)
    with (tmp_path / "items.jsonl").open("w") as f:
        for media_id, a in zip(ids.tolist(), attrs, strict=True):
            f.write(json.dumps({"id": media_id, "genres": a["genre_ids"],
                                **{k: v for k, v in a.items() if k != "genre_ids"}}) + "\n")
    code, out = _run(str(tmp_path / "items.npy"), "--catalog-dsn", str(tmp_path / "log.sqlite3"), "--dim", str(DIM),
                     "--id-column", "id", "--map", "genre_ids=genres", "--state", str(tmp_path / "s.json"))
    assert code == 0, out
    _assert_round_trip(tmp_path / "log.sqlite3", ids, vectors, attrs)


def test_json_lines_round_trip(tmp_path: Path) -> None:
    ids, vectors, attrs = _items(300)
    with (tmp_path / "items.jsonl").open("w") as f:
        for media_id, v, a in zip(ids.tolist(), vectors, attrs, strict=True):
            f.write(json.dumps({"media_id": media_id, "vector": v.tolist(), **a}) + "\n\n")
    code, out = _run(str(tmp_path / "items.jsonl"), "--catalog-dsn", str(tmp_path / "log.sqlite3"),
                     "--dim", str(DIM), "--batch-size", "64", "--state", str(tmp_path / "s.json"))
    assert code == 0, out
    _assert_round_trip(tmp_path / "log.sqlite3", ids, vectors, attrs)


def test_parquet_attributes_are_the_bytes_protobuf_writes_row_for_row(tmp_path: Path) -> None:
    """The Parquet reader encodes attributes with numpy, a column at a time; each row's bytes must be what
    MediaAttributes(...).SerializeToString(deterministic=True) gives: nulls, zeros left out, -0.0, FP32
    rounding and overflow, the largest values, long genre lists, batches that split row groups."""
    rng = np.random.default_rng(3)
    n = 3000
    ids = np.arange(1, n + 1, dtype=np.uint64)
    vectors = rng.standard_normal((n, DIM)).astype(np.float32)
    top = np.uint64((1 << 64) - 1)
    region = np.where(rng.random(n) < 0.2, top, rng.integers(0, 1 << 63, n, dtype=np.uint64) >> rng.integers(
        0, 64, n).astype(np.uint64))
    popularity = rng.choice(np.array([0.0, -0.0, 1e-46, 1e39, 0.1, 3.4028235e38]), n)
    genres = [None if i % 17 == 0 else [int(g) for g in rng.integers(0, 1 << 32, i % 40, dtype=np.uint64)]
              for i in range(n)]
    nulls = rng.random(n) < 0.1
    table = pa.table({
        "media_id": pa.array(ids),
        "vector": pa.array(vectors.tolist(), pa.list_(pa.float32())),
        "genre_ids": pa.array(genres, pa.list_(pa.uint32())),
        "rating": pa.array(rng.integers(0, 1 << 32, n, dtype=np.uint64).astype(np.uint32), mask=nulls),
        "region_mask": pa.array(region, pa.uint64()),
        "format_mask": pa.array(rng.integers(0, 3, n), pa.int64()),
        "release_year": pa.array(rng.integers(0, 10000, n), pa.int16(), mask=~nulls & (rng.random(n) < 0.1)),
        "popularity": pa.array(popularity, pa.float64(), mask=rng.random(n) < 0.05),
    })
    pq.write_table(table, tmp_path / "items.parquet", row_group_size=700)
    code, out = _run(str(tmp_path / "items.parquet"), "--catalog-dsn", str(tmp_path / "log.sqlite3"), "--dim",
                     str(DIM), "--batch-size", "512", "--state", str(tmp_path / "s.json"))
    assert code == 0, out
    entries = _log(tmp_path / "log.sqlite3")
    assert len(entries) == n
    rows = table.drop_columns(["media_id", "vector"]).to_pylist()
    for entry, row in zip(entries, rows, strict=True):
        want = common_pb2.MediaAttributes(**{k: v for k, v in row.items() if v is not None})
        assert entry.attributes == want.SerializeToString(deterministic=True), (entry.media_id, row)


@pytest.mark.parametrize(("change", "row", "says"), [
    (lambda docs: docs[3].update(vector=[1.0] * (DIM - 1)), 4, f"vector: has dimension {DIM - 1}, expected {DIM}"),
    (lambda docs: docs[3].update(vector=[float("nan")] * DIM), 4, "NaN"),
    (lambda docs: docs[3].update(vector=[1e6] * DIM), 4, "FP16"),
    (lambda docs: docs[3].update(media_id=-5), 4, "media_id: -5 is outside"),
    (lambda docs: docs[3].update(media_id="x"), 4, "not an integer id"),
    (lambda docs: docs[3].update(rating=-1), 4, "rating"),
    (lambda docs: docs[3].update(popularity=float("inf")), 4, "popularity"),
    (lambda docs: docs[3].update(genre_ids=["drama"]), 4, "genre_ids"),
])
def test_a_corrupt_row_is_rejected_with_its_position_and_its_batch_is_not_written(
        tmp_path: Path, change, row: int, says: str) -> None:
    ids, vectors, attrs = _items(10)
    docs = [{"media_id": int(i), "vector": v.tolist(), **a} for i, v, a in zip(ids, vectors, attrs, strict=True)]
    change(docs)
    (tmp_path / "items.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    # batch 1 = rows 1-2 (written), batch 2 = rows 3-4 (holds the bad row: nothing of it is written)
    code, out = _run(str(tmp_path / "items.jsonl"), "--catalog-dsn", str(tmp_path / "log.sqlite3"), "--dim",
                     str(DIM), "--batch-size", "2", "--state", str(tmp_path / "s.json"))
    assert code == 1
    assert f"items.jsonl: row {row}:" in out and says in out, out
    assert [e.media_id for e in _log(tmp_path / "log.sqlite3")] == [1, 2]


def test_a_wrong_dimension_in_parquet_names_the_row(tmp_path: Path) -> None:
    ids, vectors, _ = _items(50)
    rows = vectors.tolist()
    rows[41] = rows[41][:-2]
    table = pa.table({"media_id": pa.array(ids), "vector": pa.array(rows, pa.list_(pa.float32()))})
    pq.write_table(table, tmp_path / "items.parquet")
    code, out = _run(str(tmp_path / "items.parquet"), "--catalog-dsn", str(tmp_path / "log.sqlite3"),
                     "--dim", str(DIM), "--batch-size", "20", "--state", str(tmp_path / "s.json"))
    assert code == 1 and "items.parquet: row 42: vector: has dimension 6, expected 8" in out, out
    assert len(_log(tmp_path / "log.sqlite3")) == 40  # the two batches before the bad row's


def test_npy_of_another_dimension_is_refused(tmp_path: Path) -> None:
    np.save(tmp_path / "items.npy", np.zeros((3, DIM + 1), np.float32))
    (tmp_path / "items.jsonl").write_text("".join(json.dumps({"media_id": i}) + "\n" for i in range(3)))
    code, out = _run(str(tmp_path / "items.npy"), "--catalog-dsn", str(tmp_path / "log.sqlite3"),
                     "--dim", str(DIM), "--state", str(tmp_path / "s.json"))
    assert code == 1 and f"expected (n, {DIM})" in out and _log(tmp_path / "log.sqlite3") == []


def test_duplicate_ids_within_a_file_and_across_files(tmp_path: Path) -> None:
    ids, vectors, attrs = _items(30)
    a = _parquet(tmp_path / "a.parquet", ids[:20], vectors[:20], attrs[:20])
    dup_ids = ids[:10].copy()
    dup_ids[7] = 3
    within = _parquet(tmp_path / "within.parquet", dup_ids, vectors[:10], attrs[:10])
    code, out = _run(str(within), "--catalog-dsn", str(tmp_path / "w.sqlite3"), "--dim", str(DIM),
                     "--state", str(tmp_path / "w.json"))
    assert code == 1 and "within.parquet: row 8: media_id: duplicate id 3 (first at" in out and "row 3)" in out
    across = _parquet(tmp_path / "b.parquet", ids[15:], vectors[15:], attrs[15:])  # ids 16..20 again
    code, out = _run(str(a), str(across), "--catalog-dsn", str(tmp_path / "x.sqlite3"), "--dim", str(DIM),
                     "--state", str(tmp_path / "x.json"))
    assert code == 1 and "b.parquet: row 1: media_id: duplicate id 16" in out and "a.parquet row 16" in out, out
    # last-wins: both files go in, in order; replicas apply the log in order, so the later rows win
    code, out = _run(str(a), str(across), "--catalog-dsn", str(tmp_path / "y.sqlite3"), "--dim", str(DIM),
                     "--state", str(tmp_path / "y.json"), "--duplicates", "last-wins")
    assert code == 0, out
    entries = _log(tmp_path / "y.sqlite3")
    assert [e.media_id for e in entries] == list(range(1, 21)) + list(range(16, 31))


def test_resume_after_a_kill_writes_every_row_exactly_once(tmp_path: Path) -> None:
    n = 60_000
    ids, vectors, attrs = _items(n)
    source = _parquet(tmp_path / "items.parquet", ids, vectors, attrs)
    dsn, state = tmp_path / "log.sqlite3", tmp_path / "state.json"
    argv = [sys.executable, "-m", "gmco_cli", "import", str(source), "--catalog-dsn", str(dsn), "--dim", str(DIM),
            "--batch-size", "1000", "--state", str(state), "--quiet"]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and proc.poll() is None:
            if state.exists() and json.loads(state.read_text())["files"]:
                break
            time.sleep(0.01)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(10)
    done_before = sum(f["rows_done"] for f in json.loads(state.read_text())["files"].values())
    assert 0 < done_before < n, "the kill should land mid-import"
    result = subprocess.run(argv, capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 0, result.stderr
    assert "already committed by an earlier run" in result.stdout
    entries = _log(dsn)
    assert [e.media_id for e in entries] == list(range(1, n + 1))  # nothing lost, nothing twice
    assert entries[-1].lsn == n
    # Once complete, a rerun writes nothing; --restart writes everything again.
    again = subprocess.run(argv, capture_output=True, text=True, timeout=120, check=True)
    assert "imported 0 items" in again.stdout and len(_log(dsn)) == n


def test_a_nan_in_fp16_bytes_names_the_row(tmp_path: Path) -> None:
    ids, vectors, _ = _items(30)
    raw = vectors.astype("<f2")
    raw[17, 3] = np.float16("nan")
    raw[25, 0] = np.float16("-inf")
    table = pa.table({"media_id": pa.array(ids), "vector": pa.array([r.tobytes() for r in raw], pa.binary())})
    pq.write_table(table, tmp_path / "items.parquet")
    code, out = _run(str(tmp_path / "items.parquet"), "--catalog-dsn", str(tmp_path / "log.sqlite3"),
                     "--dim", str(DIM), "--state", str(tmp_path / "s.json"))
    assert code == 1 and "items.parquet: row 18: vector: holds NaN or Inf" in out, out


def test_a_batch_committed_but_not_yet_recorded_is_not_written_twice(tmp_path: Path) -> None:
    """The window a kill can hit: the log committed a batch, the resume file does not say so yet."""
    ids, vectors, attrs = _items(900)
    source = _parquet(tmp_path / "items.parquet", ids, vectors, attrs)
    dsn, state = tmp_path / "log.sqlite3", tmp_path / "state.json"
    args = (str(source), "--catalog-dsn", str(dsn), "--dim", str(DIM), "--batch-size", "300", "--state", str(state))
    assert _run(*args)[0] == 0
    doc = json.loads(state.read_text())
    for entry in doc["files"].values():
        entry["rows_done"] = 300  # as if the last two batches' records were lost
    state.write_text(json.dumps(doc))
    code, out = _run(*args)
    assert code == 0 and "imported 0 items (900 already committed" in out, out
    assert [e.media_id for e in _log(dsn)] == list(range(1, 901))
