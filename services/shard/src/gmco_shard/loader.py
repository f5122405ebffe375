"""Start-up state: this shard's slots, and its rows from a snapshot or a catalogue directory."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
from gmco_common.config import ConfigError
from gmco_common.datagen import load_catalogue
from gmco_common.slots import NUM_SLOTS, SlotMap, slots_of
from prometheus_client import Gauge
from tqdm import tqdm

from gmco_shard.columns import columns_from_catalogue
from gmco_shard.config import Settings
from gmco_shard.snapshot import load_snapshot, snapshot_exists
from gmco_shard.store import ShardStore

log = logging.getLogger(__name__)

STARTED_FROM = Gauge("gmco_shard_started_from_info",
                     "What this replica loaded at start (1 for that source): snapshot, catalogue or empty.", ["source"])
_CHUNK = 50_000


def slot_map(settings: Settings) -> SlotMap:
    if settings.slot_map_file is not None:
        return SlotMap.from_json(Path(settings.slot_map_file).read_text())
    return SlotMap.even(settings.shard_count)


def load_catalogue_slots(store: ShardStore, data_dir: Path, owned: np.ndarray, progress: bool = True) -> int:
    """Load the rows of ``data_dir`` whose slot is owned (bool mask over the 4096 slots); build the index.
    The vectors are read from the memory-mapped catalogue in chunks while the index is built."""
    cat = load_catalogue(data_dir)
    if cat.dim != store.dim:
        raise ConfigError(f"catalogue {data_dir} has dimension {cat.dim}; GMCO_SHARD_DIM is {store.dim}: set it to "
                          f"{cat.dim} or point GMCO_SHARD_DATA_DIR at a {store.dim}-d catalogue")
    keep_parts = []
    for start in tqdm(range(0, len(cat), _CHUNK), desc=f"select slots from {data_dir.name}", unit="chunk",
                      disable=not progress):
        ids = np.asarray(cat.media_ids[start:start + _CHUNK])
        keep_parts.append(start + np.flatnonzero(owned[slots_of(ids.tolist())]))
    rows = np.concatenate(keep_parts) if keep_parts else np.empty(0, np.int64)
    everything = rows.shape[0] == len(cat)
    store.bulk_load(cat.vectors, columns_from_catalogue(cat, rows), progress=progress,
                    rows=None if everything else rows)
    return len(rows)


def initial_load(store: ShardStore, settings: Settings, slots: list[int]) -> str:
    """Fill ``store`` at start: a usable snapshot wins over the catalogue; returns what was loaded."""
    if settings.snapshot_dir is not None and snapshot_exists(settings.snapshot_dir):
        lsn = load_snapshot(store, settings.snapshot_dir)
        if lsn is not None:
            STARTED_FROM.labels("snapshot").set(1)
            return f"snapshot at lsn {lsn} ({store.stats()['item_count']} items)"
        log.error("no usable snapshot in %s: starting from the catalogue and replaying the log from lsn 0",
                  settings.snapshot_dir)
    if settings.data_dir is not None:
        owned = np.zeros(NUM_SLOTS, bool)
        owned[slots] = True
        n = load_catalogue_slots(store, settings.data_dir, owned)
        STARTED_FROM.labels("catalogue").set(1)
        return f"{n} items from {settings.data_dir}"
    store.mark_loaded()
    STARTED_FROM.labels("empty").set(1)
    return "empty"
