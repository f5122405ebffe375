"""The catalogue log's contract, run against SQLite and against a real PostgreSQL 15 started on loopback."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
from gmco_catalog.log import Op, Upserts, Write
from gmco_catalog.postgres_log import PostgresCatalogLog
from gmco_catalog.sqlite_log import SqliteCatalogLog
from gmco_catalog.tailer import LogTailer
from gmco_common.errors import InvalidArgument
from gmco_common.slots import slot_of


def _w(i: int) -> Write:
    return Write(Op.UPSERT, i, vector=bytes([i % 256]) * 8, attributes=b"")


async def contract_append_read(log) -> None:
    r1 = await log.append([_w(1), _w(2), _w(3)])
    assert r1.last_lsn - r1.first_lsn == 2
    r2 = await log.append([Write(Op.DELETE, 2)], request_id="req-1")
    again = await log.append([Write(Op.DELETE, 2)], request_id="req-1")
    assert again.duplicate and (again.first_lsn, again.last_lsn) == (r2.first_lsn, r2.last_lsn)
    assert await log.head_lsn() == r2.last_lsn
    everything = await log.read(0, None, 100)
    assert [e.media_id for e in everything.entries] == [1, 2, 3, 2]
    assert [e.op for e in everything.entries] == [Op.UPSERT] * 3 + [Op.DELETE]
    assert [e.lsn for e in everything.entries] == [*range(r1.first_lsn, r1.last_lsn + 1), r2.first_lsn]
    assert everything.scanned_lsn == r2.last_lsn
    page = await log.read(0, None, 2)
    assert len(page.entries) == 2 and page.scanned_lsn == page.entries[-1].lsn
    mine = await log.read(0, [slot_of(3)], 100)
    assert {e.media_id for e in mine.entries} == {3}
    assert mine.scanned_lsn == r2.last_lsn  # scanned past entries of other slots
    big = (1 << 64) - 5
    await log.append([Write(Op.DELETE, big)])
    assert (await log.read(r2.last_lsn, None, 10)).entries[0].media_id == big
    with pytest.raises(InvalidArgument, match="items"):
        await log.append([])
    with pytest.raises(InvalidArgument, match=r"items\[0\].vector"):
        await log.append([Write(Op.UPSERT, 9)])


async def contract_columnar_upserts(log) -> None:
    """An ``Upserts`` batch (gmco import) appends exactly what the same ``Write`` s append: same slots, ids
    (one beyond 2^63 too), vectors and attributes, in order, one lsn each; malformed columns are refused."""
    ids = np.array([7, (1 << 64) - 3, 1 << 40, 12], np.uint64)
    vectors = np.arange(4 * 6, dtype=np.float16).reshape(4, 6)
    attrs = [bytes([i]) * (i + 1) for i in range(4)]
    cols = await log.append(Upserts(ids, vectors, attrs), request_id="cols-1")
    rows = await log.append([Write(Op.UPSERT, int(m), vectors[i].tobytes(), attrs[i]) for i, m in enumerate(ids.tolist())])
    assert cols.last_lsn - cols.first_lsn == 3 and rows.first_lsn == cols.last_lsn + 1
    again = await log.append(Upserts(ids, vectors, attrs), request_id="cols-1")
    assert again.duplicate and again.last_lsn == cols.last_lsn
    got = (await log.read(cols.first_lsn - 1, None, 100)).entries
    a, b = got[:4], got[4:]
    assert [(e.slot, e.op, e.media_id, bytes(e.vector), e.attributes) for e in a] == \
        [(e.slot, e.op, e.media_id, bytes(e.vector), e.attributes) for e in b]
    assert [e.media_id for e in a] == ids.tolist() and [e.slot for e in a] == [slot_of(m) for m in ids.tolist()]
    with pytest.raises(InvalidArgument, match="items.vectors"):
        await log.append(Upserts(ids, vectors.astype(np.float32), attrs))
    with pytest.raises(InvalidArgument, match="items.attributes"):
        await log.append(Upserts(ids, vectors, attrs[:3]))
    with pytest.raises(InvalidArgument, match="items"):
        await log.append(Upserts(ids[:0], vectors[:0], []))


async def contract_tailer(log) -> None:
    applied: list[int] = []

    async def apply(entries, scanned):
        applied.extend(e.media_id for e in entries)

    tailer = LogTailer(log, None, apply, start_lsn=0, batch_size=7, idle_wait=0.05)
    task = asyncio.create_task(tailer.run())
    try:
        acked = []
        for start in range(0, 50, 10):
            res = await log.append([_w(i) for i in range(start, start + 10)])
            acked.append(res.last_lsn)
        assert await tailer.wait_for(acked[-1], timeout=10)
        assert applied == list(range(50))
        assert tailer.lag_entries == 0
    finally:
        task.cancel()


_db_counter = iter(range(1000))


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.integration)])
async def catalog_log(request, tmp_path):
    if request.param == "sqlite":
        log = SqliteCatalogLog(tmp_path / "log.db")
    else:
        server = request.getfixturevalue("postgres")
        log = PostgresCatalogLog(server.create_database(f"catalog_{next(_db_counter)}"))
    async with log:
        yield log


async def test_append_read(catalog_log) -> None:
    await contract_append_read(catalog_log)


async def test_columnar_upserts_append_as_writes_do(catalog_log) -> None:
    await contract_columnar_upserts(catalog_log)


async def test_tailer_applies_in_order(catalog_log) -> None:
    await contract_tailer(catalog_log)


async def test_concurrent_writers_commit_in_lsn_order(catalog_log) -> None:
    """Readers polling by lsn never skip an entry while many writers append at once."""
    seen: list[int] = []

    async def apply(entries, scanned):
        seen.extend(e.lsn for e in entries)

    tailer = LogTailer(catalog_log, None, apply, start_lsn=0, batch_size=50, idle_wait=0.01)
    task = asyncio.create_task(tailer.run())
    try:
        results = await asyncio.gather(*(catalog_log.append([_w(i), _w(i + 1000)]) for i in range(40)))
        last = max(r.last_lsn for r in results)
        assert await tailer.wait_for(last, timeout=20)
        assert sorted(seen) == seen and len(seen) == 80 and len(set(seen)) == 80
    finally:
        task.cancel()


async def test_sqlite_survives_reopen(tmp_path) -> None:
    async with SqliteCatalogLog(tmp_path / "log.db") as log:
        res = await log.append([_w(1)], request_id="r")
    async with SqliteCatalogLog(tmp_path / "log.db") as log:
        assert await log.head_lsn() == res.last_lsn
        assert (await log.append([_w(1)], request_id="r")).duplicate


@pytest.mark.integration
async def test_postgres_down_is_unavailable_and_acked_writes_survive(postgres) -> None:
    from gmco_common.errors import Unavailable

    dsn = postgres.create_database("catalog_restart")
    async with PostgresCatalogLog(dsn, timeout=2.0) as log:
        acked = (await log.append([_w(1), _w(2)])).last_lsn
        postgres.kill9()
        with pytest.raises(Unavailable):
            await log.append([_w(3)])
        postgres.start()
        for _ in range(50):  # the pool reconnects on its own
            try:
                await log.append([_w(4)])
                break
            except Unavailable:
                await asyncio.sleep(0.2)
        ids = [e.media_id for e in (await log.read(0, None, 100)).entries]
        assert ids[:2] == [1, 2] and ids[-1] == 4 and (await log.head_lsn()) > acked
