"""Apply catalogue-log entries to a shard store, in lsn order.

Batches. The tailer hands over a batch of entries at a time (thousands during a bulk import), and the
batch is applied as a whole: vectors are decoded and checked together with numpy, attribute columns are
built a column at a time, and the store takes one ``delete`` and one ``upsert``. The result is the one
applying the entries one by one in lsn order would give: for each media id only its last valid entry in
the batch counts (an upsert replaces, a delete removes whatever came before it, an upsert after a
delete brings the id back). ``applied_lsn`` moves to the batch's ``scanned_lsn`` only after every row
is in.

Poison entries. The router validates every write, so an entry this replica cannot apply was written by
another writer (an older or buggy one, or by hand): a vector of the wrong size, undecodable attributes,
attributes out of their bounds, non-finite values. The policy is **skip, count and alert**: the entry is
logged with its lsn and reason, counted in ``gmco_shard_log_entries_skipped_total{reason}`` (the
``GmcoShardPoisonLogEntries`` alert fires on it), and tailing goes on. A skipped entry changes nothing:
an earlier valid write of the same id stands. Every replica decides the same way from the same bytes,
so replicas stay identical; stopping instead would take every replica of the shard out of service at
once for one bad row.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np
from gmco.common.v1 import common_pb2
from gmco_catalog.log import LogEntry, Op
from google.protobuf.message import DecodeError
from prometheus_client import Counter

from gmco_shard.columns import AttributeColumns, columns_from_attributes
from gmco_shard.store import ShardStore

log = logging.getLogger(__name__)

SKIPPED = Counter("gmco_shard_log_entries_skipped_total",
                  "Catalogue-log entries this replica could not apply and skipped, by reason.", ["reason"])

_UPSERT, _DELETE = int(Op.UPSERT), int(Op.DELETE)


def _skip(entry: LogEntry, reason: str) -> None:
    SKIPPED.labels(reason).inc()
    if reason == "unknown_op":
        log.error("catalogue-log entry lsn %d has unknown op %r; skipped", entry.lsn, entry.op)
    else:
        log.error("catalogue-log entry lsn %d (media %d) skipped: %s", entry.lsn, entry.media_id, reason)


def _decode_upserts(upserts: Sequence[LogEntry], dim: int) -> tuple[np.ndarray, np.ndarray, AttributeColumns, int]:
    """Decode a batch of upserts: (positions in ``upserts`` that are valid, their FP16 vectors (n, dim),
    their attribute columns, how many were skipped). Checks come in this order, the first failing one
    naming the reason: vector size, finite vector, attributes that decode, attributes in bounds."""
    width = dim * 2
    raw = [e.vector or b"" for e in upserts]
    sized = np.fromiter(map(len, raw), np.int64, len(raw)) == width
    skipped = 0
    for i in np.flatnonzero(~sized).tolist():
        _skip(upserts[i], "vector_size")
        skipped += 1
    ok = np.flatnonzero(sized)
    vectors = np.frombuffer(b"".join([raw[i] for i in ok.tolist()]), np.float16).reshape(-1, dim)
    # NaN and Inf are the FP16 values whose exponent bits are all set
    finite = (vectors.view(np.uint16) & 0x7FFF).max(axis=1, initial=0) < 0x7C00
    for i in ok[~finite].tolist():
        _skip(upserts[i], "vector_not_finite")
        skipped += 1
    if not finite.all():
        ok, vectors = ok[finite], vectors[finite]
    parse = common_pb2.MediaAttributes.FromString
    attrs, decoded = [], np.ones(ok.shape[0], bool)
    for j, i in enumerate(ok.tolist()):
        try:
            attrs.append(parse(upserts[i].attributes or b""))
        except DecodeError:
            _skip(upserts[i], "attributes_undecodable")
            skipped += 1
            decoded[j] = False
    if not decoded.all():
        ok, vectors = ok[decoded], vectors[decoded]
    ids = np.fromiter((upserts[i].media_id for i in ok.tolist()), np.uint64, ok.shape[0])
    cols, bad = columns_from_attributes(ids, attrs)
    for i in ok[bad].tolist():
        _skip(upserts[i], "attributes_out_of_bounds")
        skipped += 1
    if bad.any():
        ok, vectors, cols = ok[~bad], vectors[~bad], cols.take(np.flatnonzero(~bad))
    return ok, vectors, cols, skipped


def apply_entries(store: ShardStore, entries: list[LogEntry], scanned_lsn: int) -> int:
    """Apply a batch of entries (lsn order) as one; then record ``scanned_lsn`` as applied. Returns how many
    entries were skipped as poison."""
    ops = np.fromiter((int(e.op) for e in entries), np.int64, len(entries))
    skipped = 0
    for i in np.flatnonzero((ops != _UPSERT) & (ops != _DELETE)).tolist():
        _skip(entries[i], "unknown_op")
        skipped += 1
    upsert_at = np.flatnonzero(ops == _UPSERT)
    upserts = [entries[i] for i in upsert_at.tolist()]
    valid, vectors, cols, bad = _decode_upserts(upserts, store.dim)
    skipped += bad
    delete_at = np.flatnonzero(ops == _DELETE)
    # Every valid entry in lsn order; for each id, its last one decides.
    at = np.concatenate([upsert_at[valid], delete_at])
    order = np.argsort(at, kind="stable")
    ids = np.concatenate([cols.media_ids,
                          np.fromiter((entries[i].media_id for i in delete_at.tolist()), np.uint64,
                                      delete_at.shape[0])])[order]
    _, last_reversed = np.unique(ids[::-1], return_index=True)
    last = np.zeros(ids.shape[0], bool)
    last[ids.shape[0] - 1 - last_reversed] = True
    is_upsert = order < valid.shape[0]
    keep = order[last & is_upsert]  # the deciding upserts, as positions among the decoded ones
    gone = ids[last & ~is_upsert]
    # The two id sets are disjoint, so their order does not matter; neither call moves applied_lsn.
    if gone.shape[0]:
        store.delete(gone)
    if keep.shape[0] < vectors.shape[0]:  # some upserts were overtaken by a later write of their id
        vectors, cols = vectors[keep], cols.take(keep)
    if vectors.shape[0]:
        store.upsert(cols.media_ids, vectors, cols)
    store.mark_applied(scanned_lsn)
    return skipped
