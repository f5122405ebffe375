"""The catalogue change log: its entries and the protocol both implementations keep
(``postgres_log.PostgresCatalogLog``, ``sqlite_log.SqliteCatalogLog``; ``gmco_catalog.open_log`` opens one).

Every catalogue write is appended here first and acknowledged only after it has committed; the reply
carries its ``lsn``. Shard replicas are derived state: each tails the entries of its own slots in
``lsn`` order (see :mod:`gmco_catalog.tailer`).

Ordering guarantee. Writers take one transaction-scoped advisory lock (PostgreSQL) or the database
write lock (SQLite) before they draw ``lsn`` values, so transactions commit in ``lsn`` order and the
committed log is always a gap-free prefix. A reader that sees ``head`` has seen every entry
``<= head``; polling by ``lsn`` therefore never misses an entry, and LISTEN/NOTIFY only wakes readers
early.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from enum import IntEnum
from typing import Protocol

from gmco_common.errors import InvalidArgument


class Op(IntEnum):
    UPSERT = 1
    DELETE = 2


_OPS = {int(op): op for op in Op}


def parse_op(value: int) -> Op | int:
    """A stored op code as :class:`Op`; a code this version does not know (a newer or buggy writer) stays a
    plain int, so that readers can skip the entry instead of failing on it. (A dict lookup: ``Op(value)``
    was a fifth of a replica's log reads during a bulk import.)"""
    return _OPS.get(value, value)


@dataclass(frozen=True)
class Write:
    """One change to append. ``vector`` is FP16 little-endian bytes; ``attributes`` MediaAttributes bytes."""

    op: Op
    media_id: int
    vector: bytes | None = None
    attributes: bytes | None = None


@dataclass(frozen=True)
class LogEntry:
    lsn: int
    slot: int
    op: Op | int  # a plain int: an op this version does not know (see parse_op)
    media_id: int
    vector: bytes | None
    attributes: bytes | None


@dataclass(frozen=True)
class AppendResult:
    first_lsn: int
    last_lsn: int
    # True when request_id had already been appended: nothing was written this time.
    duplicate: bool = False


@dataclass(frozen=True)
class ReadResult:
    entries: list[LogEntry]
    # Every entry of the requested slots with lsn <= scanned_lsn has been returned (now or before).
    scanned_lsn: int
    head_lsn: int


class CatalogLog(Protocol):
    async def append(self, writes: Sequence[Write], request_id: str | None = None) -> AppendResult: ...
    async def read(self, after_lsn: int, slots: Sequence[int] | None, limit: int) -> ReadResult: ...
    async def head_lsn(self) -> int: ...
    async def wait_for_change(self, after_lsn: int, timeout: float) -> None: ...
    async def close(self) -> None: ...


def check_writes(writes: Sequence[Write]) -> None:
    if not writes:
        raise InvalidArgument("items", "the batch is empty")
    for i, w in enumerate(writes):
        if w.op == Op.UPSERT and not w.vector:
            raise InvalidArgument(f"items[{i}].vector", "an upsert needs a vector")
