"""Atomic shard snapshots: index, vectors, columns, tombstones and ``applied_lsn``.

A snapshot is written into a fresh directory ``snap-<generation>-<lsn>-<time>``, fsynced, and then
published by atomically replacing the ``CURRENT`` pointer file (write a temp file, ``os.replace``).
A crash at any point leaves the previous snapshot intact. Older snapshots are removed afterwards.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import numpy as np
from gmco_common.config import ConfigError

from gmco_shard.filters import AttributeColumns
from gmco_shard.store import ShardStore, Table

CURRENT = "CURRENT"
FORMAT = 1


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_snapshot(store: ShardStore, root: Path) -> tuple[Path, int]:
    """Write a snapshot of ``store``; returns (its directory, bytes written)."""
    root.mkdir(parents=True, exist_ok=True)
    with store._lock:  # a consistent cut: copy under the lock, write outside it
        t: Table = store.table
        n, sealed, lsn = t.n, t.sealed, store.applied_lsn
        arrays = {"vectors": t.vectors[:n].copy(), "alive": t.alive[:n].copy()}
        arrays.update({f"col_{name}": getattr(t.cols, name)[:n].copy() for name in t.cols.__dataclass_fields__})
        index, generation = t.index, t.generation
    name = f"snap-{generation}-{lsn}-{time.time_ns()}"
    tmp = root / (name + ".tmp")
    tmp.mkdir()
    for key, arr in arrays.items():
        with open(tmp / f"{key}.npy", "wb") as fh:
            np.save(fh, arr)
            fh.flush()
            os.fsync(fh.fileno())
    index.save(tmp)
    meta = {"format": FORMAT, "n": n, "sealed": sealed, "applied_lsn": lsn, "dim": store.dim,
            "backend": store.backend, "metric": store.params.metric, "generation": generation}
    (tmp / "meta.json").write_text(json.dumps(meta))
    for f in tmp.iterdir():
        if f.is_file() and f.suffix != ".npy":
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
    _fsync_dir(tmp)
    final = root / name
    os.replace(tmp, final)
    pointer = root / (CURRENT + ".tmp")
    pointer.write_text(name)
    with open(pointer, "rb") as fh:
        os.fsync(fh.fileno())
    os.replace(pointer, root / CURRENT)
    _fsync_dir(root)
    for old in root.iterdir():
        if old.name.startswith("snap-") and old.name != name:
            shutil.rmtree(old, ignore_errors=True)
    size = sum(f.stat().st_size for f in final.iterdir())
    return final, size


def snapshot_exists(root: Path) -> bool:
    return (root / CURRENT).is_file()


def load_snapshot(store: ShardStore, root: Path) -> int:
    """Load the current snapshot into ``store``; returns its ``applied_lsn``."""
    directory = root / (root / CURRENT).read_text().strip()
    meta = json.loads((directory / "meta.json").read_text())
    if meta["dim"] != store.dim:
        raise ConfigError(f"snapshot {directory} has dimension {meta['dim']}, GMCO_SHARD_DIM is {store.dim}; "
                          "delete the snapshot or change the setting")
    if meta["backend"] != store.backend or meta["metric"] != store.params.metric:
        raise ConfigError(f"snapshot {directory} was built with {meta['backend']}/{meta['metric']}, the shard is "
                          f"configured for {store.backend}/{store.params.metric}; delete it or change the settings")
    n, sealed = meta["n"], meta["sealed"]
    table = store._new_table(max(n + n // 4, 1024), generation=meta["generation"])
    table.vectors[:n] = np.load(directory / "vectors.npy")
    table.alive[:n] = np.load(directory / "alive.npy")
    cols: AttributeColumns = table.cols
    for name in cols.__dataclass_fields__:
        getattr(cols, name)[:n] = np.load(directory / f"col_{name}.npy")
    table.n, table.sealed = n, sealed
    table.index.load(directory, table.vectors[:sealed])
    with store._lock:
        store.table = table
        live = np.flatnonzero(table.alive[:n])
        store._ids = {int(cols.media_ids[r]): int(r) for r in live}
        store.applied_lsn = meta["applied_lsn"]
        store.loaded = True
    return meta["applied_lsn"]
