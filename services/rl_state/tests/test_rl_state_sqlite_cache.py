"""The SQLite store's in-memory copies of recent user states: never older than the database."""

from __future__ import annotations

import dataclasses

from gmco_rl_state.model import Event, StateRow
from gmco_rl_state.sqlite_store import SqliteStore


def _event(user: str, n: int) -> Event:
    return Event(f"e-{user}-{n}", user, 7, 1.0, 0, 1, "US", "tv", 0.5, None)


def _apply(row: StateRow | None, user: str, events) -> StateRow:
    version = (row.version if row else 0) + 1
    return StateRow(user, version, (row.event_count if row else 0) + len(events), None, b"a", b"b", b"")


async def _reads_of(store: SqliteStore, user: str) -> tuple[StateRow | None, int]:
    """(the row ``get`` returns, how many database reads that took)."""
    reads = 0
    real = store._worker.call

    async def counting(fn, *args):
        nonlocal reads
        reads += fn is SqliteStore._get
        return await real(fn, *args)

    store._worker.call = counting
    try:
        return await store.get(user, None), reads
    finally:
        store._worker.call = real


async def test_written_states_are_read_from_memory_at_their_new_version(tmp_path) -> None:
    async with SqliteStore(tmp_path / "rl.sqlite3", "fp", cache_entries=2) as store:
        assert await _reads_of(store, "u1") == (None, 1)  # no state yet: remembered as absent
        assert await _reads_of(store, "u1") == (None, 0)
        await store.record({"u1": [_event("u1", 1)]}, _apply)  # the first write ends that at once
        row, reads = await _reads_of(store, "u1")
        assert (row.version, reads) == (1, 0)
        await store.record({"u1": [_event("u1", 2)]}, _apply)
        assert (await _reads_of(store, "u1"))[0].version == 2
        store._remember(dataclasses.replace(row, version=1))  # a read that overlapped the write: ignored
        assert (await _reads_of(store, "u1"))[0].version == 2
        for u in ("u2", "u3"):  # two more users push u1 out of a 2-entry cache
            await store.record({u: [_event(u, 1)]}, _apply)
        row, reads = await _reads_of(store, "u1")
        assert (row.version, reads) == (2, 1)


async def test_without_a_cache_every_read_asks_the_database(tmp_path) -> None:
    async with SqliteStore(tmp_path / "rl.sqlite3", "fp") as store:
        await store.record({"u1": [_event("u1", 1)]}, _apply)
        assert (await _reads_of(store, "u1"))[1] == 1
        assert (await _reads_of(store, "u1"))[1] == 1


async def test_a_read_that_overlapped_a_write_never_marks_its_user_absent(tmp_path) -> None:
    async with SqliteStore(tmp_path / "rl.sqlite3", "fp", cache_entries=8) as store:
        real = store._worker.call

        async def read_then_write(fn, *args):
            got = await real(fn, *args)  # the read saw no row ...
            if fn is SqliteStore._get:
                store._worker.call = real
                await store.record({"u9": [_event("u9", 1)]}, _apply)  # ... and a write committed meanwhile
                store._rows.clear()  # even with the new copy gone from memory
            return got

        store._worker.call = read_then_write
        assert await store.get("u9", None) is None
        assert (await _reads_of(store, "u9"))[0].version == 1  # read from the database, not "absent"
