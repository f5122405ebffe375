"""Atomic, checksummed shard snapshots: every segment's rows, columns, tombstones and index, and
``applied_lsn``.

Layout: ``<root>/snap-<generation>-<lsn>-<time>/`` holds ``meta.json`` and one ``seg-NNN/`` directory per
segment. ``meta.json`` records each file's xxh3-64 checksum. A snapshot is written into ``<name>.tmp``,
fsynced, renamed, and published by atomically replacing the ``CURRENT`` pointer (temp file, ``os.replace``),
so a crash at any point leaves the previous snapshot whole. The newest ``KEEP`` snapshots are kept.
A save that fails (a full disk, say) removes what it wrote, so that it does not hold the space the next
one needs; a full disk is RESOURCE_EXHAUSTED naming the directory. One save runs at a time per process,
and each first removes ``.tmp`` leftovers of saves that crashed.

Loading verifies every checksum before anything is installed. A snapshot that is corrupt, truncated or
unreadable is refused (and counted in ``gmco_shard_snapshots_rejected_total``); the next older one is
tried, and when none is usable the replica starts from its catalogue (data directory) and replays the log:
partial data is never served.
"""

from __future__ import annotations

import errno
import io
import json
import logging
import os
import shutil
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import xxhash
from gmco_common.config import ConfigError
from gmco_common.errors import GmcoError, ResourceExhausted
from prometheus_client import Counter

from gmco_shard import bitmaps
from gmco_shard.columns import AttributeColumns, empty_columns
from gmco_shard.filters import AttributeIndex
from gmco_shard.index.base import create_index
from gmco_shard.segment import IdIndex, Segment
from gmco_shard.store import ShardStore

log = logging.getLogger(__name__)

CURRENT = "CURRENT"
FORMAT = 2
KEEP = 2
_CHUNK = 16 << 20

REJECTED = Counter("gmco_shard_snapshots_rejected_total",
                   "Snapshots refused at start (bad checksum, truncated, unreadable), by reason.", ["reason"])


class SnapshotError(Exception):
    """A snapshot that must not be loaded; the message says which file and why."""


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _checksum(path: Path) -> str:
    h = xxhash.xxh3_64()
    with open(path, "rb") as fh:
        while block := fh.read(_CHUNK):
            h.update(block)
    return h.hexdigest()


def _save_array(path: Path, arr: np.ndarray) -> str:
    """Write ``arr`` as a ``.npy`` file and fsync it; returns the file's checksum, hashed from the bytes as
    they are written: reading a 2 GB table back to hash it doubled the memory traffic a snapshot takes from
    the searches running beside it."""
    arr = np.ascontiguousarray(arr)
    h = xxhash.xxh3_64()
    with open(path, "wb") as fh:
        header = io.BytesIO()
        np.lib.format.write_array_header_1_0(header, np.lib.format.header_data_from_array_1_0(arr))
        h.update(header.getvalue())
        fh.write(header.getvalue())
        data = memoryview(arr.reshape(-1).view(np.uint8))
        for start in range(0, data.nbytes, _CHUNK):
            piece = data[start:start + _CHUNK]
            h.update(piece)
            fh.write(piece)
        fh.flush()
        os.fsync(fh.fileno())
    return h.hexdigest()


_SAVING = threading.Lock()


def save_snapshot(store: ShardStore, root: Path) -> tuple[Path, int]:
    """Write a snapshot of ``store``; returns (its directory, bytes written)."""
    with _SAVING:
        root.mkdir(parents=True, exist_ok=True)
        for stale in root.glob("*.tmp"):
            _remove(stale)
        cut = store.cut()
        name = f"snap-{cut.generation}-{cut.applied_lsn}-{time.time_ns()}"
        tmp = root / (name + ".tmp")
        try:
            return _write(store, cut, root, name, tmp)
        except BaseException as exc:
            _remove(tmp)
            _remove(root / (CURRENT + ".tmp"))
            if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
                raise ResourceExhausted(f"snapshot directory {root} is full ({exc.strerror}); the previous "
                                        "snapshot is kept; free space there") from exc
            raise


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists():
        path.unlink(missing_ok=True)


def _write(store: ShardStore, cut: Any, root: Path, name: str, tmp: Path) -> tuple[Path, int]:
    tmp.mkdir()
    segments = []
    files: dict[str, str] = {}  # checksums of the files written here, hashed as they were written
    for i, (seg, n, alive) in enumerate(cut.segments):
        directory = tmp / f"seg-{i:03d}"
        directory.mkdir()
        index = seg.index if seg.sealed else None
        # an index that stores the rows itself (HNSW over FP16) writes them; otherwise the segment does
        own_rows = index is not None and index.saves_rows
        arrays = {"alive.npy": alive, **{f"col_{col}.npy": getattr(seg.cols, col)[:n] for col in seg.cols.names}}
        if not own_rows:
            arrays = {"vectors.npy": seg.vectors[:n], **arrays}
        for file, arr in arrays.items():
            files[f"{directory.name}/{file}"] = _save_array(directory / file, arr)
        if index is not None:
            index.save(directory)
        segments.append({"dir": directory.name, "n": n, "sealed": seg.sealed, "own_rows": own_rows})
    for f in sorted(tmp.rglob("*")):  # what the indexes wrote themselves
        if f.is_file() and str(f.relative_to(tmp)) not in files:
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
            files[str(f.relative_to(tmp))] = _checksum(f)
    files = dict(sorted(files.items()))
    meta = {"format": FORMAT, "applied_lsn": cut.applied_lsn, "generation": cut.generation, "dim": store.dim,
            "backend": store.backend, "metric": store.params.metric, "segments": segments, "files": files}
    (tmp / "meta.json").write_text(json.dumps(meta))
    with open(tmp / "meta.json", "rb") as fh:
        os.fsync(fh.fileno())
    for d in [tmp, *(p for p in tmp.iterdir() if p.is_dir())]:
        _fsync_dir(d)
    final = root / name
    os.replace(tmp, final)
    pointer = root / (CURRENT + ".tmp")
    pointer.write_text(name)
    with open(pointer, "rb") as fh:
        os.fsync(fh.fileno())
    os.replace(pointer, root / CURRENT)
    _fsync_dir(root)
    _prune(root, keep=name)
    size = sum(f.stat().st_size for f in final.rglob("*") if f.is_file())
    return final, size


def _prune(root: Path, keep: str) -> None:
    """Keep the newest KEEP complete snapshots (``keep`` among them); remove older ones and leftovers."""
    snaps = sorted((p for p in root.iterdir() if p.name.startswith("snap-") and not p.name.endswith(".tmp")),
                   key=lambda p: p.stat().st_mtime_ns, reverse=True)
    survivors = {keep, *(p.name for p in snaps[:KEEP])}
    for old in root.iterdir():
        if old.name.startswith("snap-") and old.name not in survivors:
            shutil.rmtree(old, ignore_errors=True)


def snapshot_exists(root: Path) -> bool:
    return root.is_dir() and any(p.name.startswith("snap-") and not p.name.endswith(".tmp") for p in root.iterdir())


def _candidates(root: Path) -> list[Path]:
    """Snapshot directories to try, the CURRENT one first, then older ones newest first."""
    snaps = sorted((p for p in root.iterdir() if p.name.startswith("snap-") and not p.name.endswith(".tmp")
                    and p.is_dir()), key=lambda p: p.stat().st_mtime_ns, reverse=True)
    current = root / CURRENT
    if current.is_file():
        name = current.read_text().strip()
        snaps.sort(key=lambda p: p.name != name)
    return snaps


def _verify(directory: Path, store: ShardStore) -> dict[str, Any]:
    try:
        meta = json.loads((directory / "meta.json").read_text())
    except (OSError, ValueError) as exc:
        raise SnapshotError(f"{directory}/meta.json is unreadable: {exc}") from None
    if meta.get("format") != FORMAT:
        raise SnapshotError(f"{directory} has format {meta.get('format')}, this shard reads format {FORMAT}")
    if meta["dim"] != store.dim:
        raise ConfigError(f"snapshot {directory} has dimension {meta['dim']}, GMCO_SHARD_DIM is {store.dim}; "
                          "delete the snapshot or change the setting")
    if meta["backend"] != store.backend or meta["metric"] != store.params.metric:
        raise ConfigError(f"snapshot {directory} was built with {meta['backend']}/{meta['metric']}, the shard is "
                          f"configured for {store.backend}/{store.params.metric}; delete it or change the settings")
    for rel, want in meta["files"].items():
        path = directory / rel
        if not path.is_file():
            raise SnapshotError(f"{path} is missing")
        got = _checksum(path)
        if got != want:
            raise SnapshotError(f"{path} has checksum {got}, the snapshot recorded {want} (corrupt or truncated)")
    return meta


def _load_segment(store: ShardStore, directory: Path, entry: dict[str, Any]) -> Segment:
    n = entry["n"]
    cols: AttributeColumns = empty_columns(n)
    for col in cols.names:
        arr = np.load(directory / f"col_{col}.npy")
        if arr.shape[0] != n:
            raise SnapshotError(f"{directory}/col_{col}.npy has {arr.shape[0]} rows, expected {n}")
        getattr(cols, col)[:] = arr
    alive = np.load(directory / "alive.npy").astype(np.uint64, copy=False)
    if alive.shape[0] != bitmaps.words_for(n):
        raise SnapshotError(f"{directory}/alive.npy has {alive.shape[0]} words, expected {bitmaps.words_for(n)}")
    live = bitmaps.count(alive)
    if not entry["sealed"]:
        vectors = np.load(directory / "vectors.npy")
        return Segment(vectors, cols, alive, n, live, lookup={})
    index = create_index(store.backend, store.dim, store.params)
    vectors = None if entry["own_rows"] else np.load(directory / "vectors.npy")
    index.load(directory, vectors)
    table = index.vectors if entry["own_rows"] else vectors
    if table is None or table.shape != (n, store.dim):
        raise SnapshotError(f"{directory}: the index holds {None if table is None else table.shape} rows, expected "
                            f"{(n, store.dim)}")
    return Segment(table, cols, alive, n, live, index=index, attrs=AttributeIndex(cols),
                   ids=IdIndex(np.asarray(cols.media_ids)))


def load_snapshot(store: ShardStore, root: Path) -> int | None:
    """Load the newest usable snapshot into ``store``; returns its ``applied_lsn``, or None when no snapshot
    could be used (each refusal is logged with its reason)."""
    for directory in _candidates(root):
        try:
            meta = _verify(directory, store)
            segments = [_load_segment(store, directory / e["dir"], e) for e in meta["segments"]]
        except ConfigError:
            raise  # a snapshot of other settings: the operator must choose, not silently rebuild
        except SnapshotError as exc:
            REJECTED.labels("corrupt").inc()
            log.error("snapshot refused: %s; trying an older one", exc)
            continue
        except (OSError, ValueError, RuntimeError, GmcoError) as exc:  # faiss: RuntimeError on a damaged file
            REJECTED.labels("unreadable").inc()
            log.error("snapshot %s is unreadable (%s); trying an older one", directory, exc)
            continue
        store.install(segments, meta["applied_lsn"], meta["generation"])
        return meta["applied_lsn"]
    return None
