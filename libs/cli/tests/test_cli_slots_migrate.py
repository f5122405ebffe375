"""gmco slots (show, plan, move) and gmco migrate on SQLite."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest
from click.testing import CliRunner
from gmco_cli.migrate import migrate
from gmco_cli.slots import plan_rebalance, ranges, slots
from gmco_common.migrations import load_migrations
from gmco_common.slots import NUM_SLOTS, SlotMap


def _run(cmd, *args: str):
    result = CliRunner().invoke(cmd, list(args), catch_exceptions=False)
    return result.exit_code, result.output


def test_show_an_even_map() -> None:
    code, out = _run(slots, "show", "--shards", "2")
    assert code == 0
    assert "shard 0: 2048 slots ( 50.0%)  0-2047" in out and "shard 1: 2048 slots ( 50.0%)  2048-4095" in out


@pytest.mark.parametrize(("before", "after"), [(2, 3), (3, 2), (4, 5), (1, 8)])
def test_a_rebalance_is_even_and_moves_only_the_surplus(before: int, after: int) -> None:
    current = SlotMap.even(before)
    target, moves = plan_rebalance(current, after)
    counts = [target.owner.count(s) for s in range(after)]
    assert max(counts) - min(counts) <= 1 and sum(counts) == NUM_SLOTS
    changed = [s for s in range(NUM_SLOTS) if current.owner[s] != target.owner[s]]
    # the least any plan can move: every slot above a shard's new share
    share = [NUM_SLOTS // after + (1 if s < NUM_SLOTS % after else 0) for s in range(after)]
    least = sum(max(0, current.owner.count(s) - (share[s] if s < after else 0)) for s in range(before))
    assert len(changed) == least == sum(len(m[2]) for m in moves)
    for a, b, moved in moves:
        assert all(current.owner[s] == a and target.owner[s] == b for s in moved)


def test_plan_writes_the_map_and_the_steps(tmp_path: Path) -> None:
    out = tmp_path / "map.json"
    code, text = _run(slots, "plan", "--shards", "2", "--to-shards", "3", "--out", str(out))
    assert code == 0, text
    assert "1365 of 4096 slots move" in text and "GMCO_ROUTER_SLOT_MAP_FILE=" in text
    written = SlotMap.from_json(out.read_text())
    assert written.shard_count == 3 and written.owner.count(2) == 1365


def test_move_some_slots(tmp_path: Path) -> None:
    first = tmp_path / "a.json"
    first.write_text(SlotMap.even(2).to_json())
    out = tmp_path / "b.json"
    code, text = _run(slots, "move", "--map", str(first), "--slots", "0-9,2048", "--to", "1", "--out", str(out))
    assert code == 0, text
    assert "10 slots move to shard 1: 0-9" in text
    moved = SlotMap.from_json(out.read_text())
    assert moved.slots_for(1)[:10] == list(range(10)) and moved.owner[10] == 0
    code, text = _run(slots, "move", "--map", str(first), "--slots", "5000", "--to", "1")
    assert code != 0 and "outside 0..4095" in text


def test_ranges() -> None:
    assert ranges([7, 0, 1, 2, 9, 10]) == "0-2,7,9-10" and ranges([]) == ""


@pytest.mark.parametrize("store", ["catalog", "rl_state"])
def test_migrate_sqlite_status_apply_and_again(tmp_path: Path, store: str) -> None:
    path = tmp_path / f"{store}.sqlite3"
    versions = load_migrations({"catalog": "gmco_catalog", "rl_state": "gmco_rl_state"}[store], "sqlite")
    code, out = _run(migrate, store, "--dsn", str(path), "--status")
    assert code == 0 and f"{len(versions)} pending" in out and not path.exists()
    code, out = _run(migrate, store, "--dsn", str(path))
    assert code == 0 and f"{len(versions)} of {len(versions)} applied, {len(versions)} now" in out
    with sqlite3.connect(path) as db:
        assert [v for (v,) in db.execute("SELECT version FROM schema_migrations ORDER BY version")] == [
            m.version for m in versions]
    code, out = _run(migrate, store, "--dsn", str(path))
    assert code == 0 and "now" not in out and "pending" not in out


@pytest.mark.integration
@pytest.mark.parametrize("store", ["catalog", "rl_state"])
def test_migrate_postgres_status_apply_and_again(postgres, store: str) -> None:
    dsn = postgres.create_database(f"cli_migrate_{store}")
    versions = load_migrations({"catalog": "gmco_catalog", "rl_state": "gmco_rl_state"}[store], "postgres")
    code, out = _run(migrate, store, "--dsn", dsn, "--status")
    assert code == 0 and f"{len(versions)} pending" in out
    code, out = _run(migrate, store, "--dsn", dsn)
    assert code == 0 and f"{len(versions)} now" in out
    code, out = _run(migrate, store, "--dsn", dsn)
    assert code == 0 and "now" not in out and f"{len(versions)} of {len(versions)} applied" in out
