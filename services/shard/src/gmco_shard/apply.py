"""Apply catalogue-log entries to a shard store, in lsn order."""

from __future__ import annotations

import logging

import numpy as np
from gmco.common.v1 import common_pb2
from gmco_catalog.log import LogEntry, Op

from gmco_shard.store import ShardStore

log = logging.getLogger(__name__)


def apply_entries(store: ShardStore, entries: list[LogEntry], scanned_lsn: int) -> None:
    """Consecutive upserts are applied as one batch; every entry keeps its place in the order.

    An upsert whose vector does not fit this shard's dimension cannot be applied by any replica; it is
    logged and skipped rather than stopping the replica (writers validate, so this means a writer
    configured with another dimension)."""
    width = store.dim * 2
    bad = [e for e in entries if e.op == Op.UPSERT and len(e.vector or b"") != width]
    for e in bad:
        log.error("log entry lsn %d (media %d) has a %d-byte vector, expected %d; skipped",
                  e.lsn, e.media_id, len(e.vector or b""), width)
    if bad:
        entries = [e for e in entries if e not in bad]
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
