"""Apply catalogue-log entries to a shard store, in lsn order.

Poison entries. The router validates every write, so an entry this replica cannot apply was written by
another writer (an older or buggy one, or by hand): a vector of the wrong size, undecodable attributes,
attributes out of their bounds, non-finite values. The policy is **skip, count and alert**: the entry is
logged with its lsn and reason, counted in ``gmco_shard_log_entries_skipped_total{reason}`` (the
``GmcoShardPoisonLogEntries`` alert fires on it), and tailing goes on. Every replica decides the same way
from the same bytes, so replicas stay identical; stopping instead would take every replica of the shard
out of service at once for one bad row.
"""

from __future__ import annotations

import logging

import numpy as np
from gmco.common.v1 import common_pb2
from gmco_catalog.log import LogEntry, Op
from gmco_common.errors import InvalidArgument
from google.protobuf.message import DecodeError
from prometheus_client import Counter

from gmco_shard.columns import check_attributes
from gmco_shard.store import ShardStore

log = logging.getLogger(__name__)

SKIPPED = Counter("gmco_shard_log_entries_skipped_total",
                  "Catalogue-log entries this replica could not apply and skipped, by reason.", ["reason"])


def _decode(entry: LogEntry, dim: int) -> tuple[np.ndarray, common_pb2.MediaAttributes] | str:
    """The entry's vector and attributes, or the reason it cannot be applied."""
    width = dim * 2
    if len(entry.vector or b"") != width:
        return "vector_size"
    vector = np.frombuffer(entry.vector or b"", np.float16)
    if not np.isfinite(vector).all():
        return "vector_not_finite"
    try:
        attrs = common_pb2.MediaAttributes.FromString(entry.attributes or b"")
        check_attributes(attrs, "attributes")
    except DecodeError:
        return "attributes_undecodable"
    except InvalidArgument:
        return "attributes_out_of_bounds"
    return vector, attrs


def apply_entries(store: ShardStore, entries: list[LogEntry], scanned_lsn: int) -> int:
    """Consecutive upserts are applied as one batch; every entry keeps its place in the order. Returns how
    many entries were skipped as poison."""
    skipped = 0
    i = 0
    while i < len(entries):
        j = i
        if entries[i].op == Op.UPSERT:
            ids, vectors, attrs = [], [], []
            while j < len(entries) and entries[j].op == Op.UPSERT:
                decoded = _decode(entries[j], store.dim)
                if isinstance(decoded, str):
                    SKIPPED.labels(decoded).inc()
                    log.error("catalogue-log entry lsn %d (media %d) skipped: %s", entries[j].lsn,
                              entries[j].media_id, decoded)
                    skipped += 1
                else:
                    ids.append(entries[j].media_id)
                    vectors.append(decoded[0])
                    attrs.append(decoded[1])
                j += 1
            if ids:
                store.upsert(np.asarray(ids, np.uint64), np.stack(vectors), attrs, entries[j - 1].lsn)
        elif entries[i].op == Op.DELETE:
            while j < len(entries) and entries[j].op == Op.DELETE:
                j += 1
            store.delete(np.asarray([e.media_id for e in entries[i:j]], np.uint64), entries[j - 1].lsn)
        else:
            SKIPPED.labels("unknown_op").inc()
            log.error("catalogue-log entry lsn %d has unknown op %r; skipped", entries[i].lsn, entries[i].op)
            skipped += 1
            j = i + 1
        i = j
    store.mark_applied(scanned_lsn)
    return skipped
