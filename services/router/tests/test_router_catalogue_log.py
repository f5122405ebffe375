"""Catalogue writes through a durable log: validation, the committed lsn, idempotent retries, and
UNAVAILABLE (not a hang) when the log does not take the write in time."""

from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np
import pytest
from gmco.common.v1 import common_pb2
from gmco_catalog.log import AppendResult, Write
from gmco_catalog.sqlite_log import SqliteCatalogLog
from gmco_common.channels import ChannelOptions
from gmco_common.errors import InvalidArgument, Unavailable
from gmco_common.slots import SlotMap
from gmco_common.vectors import encode_vector
from gmco_router.catalogue import Catalogue
from gmco_router.replicas import ReplicaPolicy, ShardPool

DIM = 8


def _item(media_id: int, vec: np.ndarray) -> common_pb2.MediaItem:
    return common_pb2.MediaItem(media_id=media_id, vector=encode_vector(vec))


def _catalogue(log, timeout: float = 2.0) -> Catalogue:
    pool = ShardPool({0: [], 1: []}, ReplicaPolicy(), ChannelOptions())
    return Catalogue(pool, SlotMap.even(2), log, DIM, timeout)


async def test_writes_are_logged_with_their_lsn_and_retries_are_idempotent(tmp_path: Path) -> None:
    async with SqliteCatalogLog(str(tmp_path / "log.sqlite3")) as log:
        catalogue = _catalogue(log)
        vecs = np.eye(DIM, dtype=np.float32)
        count, lsn = await catalogue.upsert([_item(1, vecs[0]), _item(2, vecs[1])], "req-1")
        assert (count, lsn) == (2, 2)
        assert await catalogue.upsert([_item(1, vecs[0]), _item(2, vecs[1])], "req-1") == (2, 2)
        deleted, delete_lsn = await catalogue.delete([2, 2], "req-2")
        assert (deleted, delete_lsn) == (1, 3)
        read = await log.read(0, None, 10)
        assert [(e.lsn, e.media_id) for e in read.entries] == [(1, 1), (2, 2), (3, 2)]
        assert np.array_equal(np.frombuffer(read.entries[0].vector, "<f2"), vecs[0].astype(np.float16))


@pytest.mark.parametrize(("items", "field"), [
    ([], "items"),
    ([_item(1, np.ones(DIM)), _item(1, np.ones(DIM))], "items[1].media_id"),
    ([_item(1, np.ones(DIM // 2))], "items[0].vector"),
    ([_item(1, np.full(DIM, np.nan))], "items[0].vector"),
    ([common_pb2.MediaItem(media_id=1, vector=encode_vector(np.full(DIM, 1e6, np.float32), "float32"))],
     "items[0].vector"),  # float32 beyond the float16 range the log stores
])
async def test_bad_writes_name_the_field_and_are_not_logged(tmp_path: Path, items, field: str) -> None:
    async with SqliteCatalogLog(str(tmp_path / "log.sqlite3")) as log:
        with pytest.raises(InvalidArgument) as err:
            await _catalogue(log).upsert(items)
        assert field in str(err.value)
        assert await log.head_lsn() == 0


class _StuckLog:
    """A log whose database does not answer (as while PostgreSQL restarts)."""

    async def append(self, writes: list[Write], request_id: str | None = None) -> AppendResult:
        await asyncio.sleep(60)
        raise AssertionError("unreachable")


async def test_a_log_that_does_not_answer_gives_unavailable() -> None:
    with pytest.raises(Unavailable):
        await _catalogue(_StuckLog(), timeout=0.05).upsert([_item(1, np.ones(DIM))], "req-3")
