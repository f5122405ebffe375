"""Apply catalogue-log entries to a shard store, in lsn order."""

from __future__ import annotations

import numpy as np

from gmco.common.v1 import common_pb2
from gmco_catalog.log import LogEntry, Op
from gmco_shard.store import ShardStore


def apply_entries(store: ShardStore, entries: list[LogEntry], scanned_lsn: int) -> None:
    """Consecutive upserts are applied as one batch; every entry keeps its place in the order."""
    i = 0
    while i < len(entries):
        j = i
        if entries[i].op == Op.UPSERT:
            while j < len(entries) and entries[j].op == Op.UPSERT:
                j += 1
            run = entries[i:j]
            vectors = np.stack([np.frombuffer(e.vector or b"", np.float16) for e in run])
            attrs = [common_pb2.MediaAttributes.FromString(e.attributes or b"") for e in run]
            store.upsert(np.asarray([e.media_id for e in run], np.uint64), vectors, attrs, run[-1].lsn)
        else:
            while j < len(entries) and entries[j].op == Op.DELETE:
                j += 1
            store.delete(np.asarray([e.media_id for e in entries[i:j]], np.uint64), entries[j - 1].lsn)
        i = j
    store.mark_applied(scanned_lsn)
