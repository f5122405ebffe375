"""``gmco slots``: show a slot map, plan a rebalance, move slots (docs/resharding.md).

A map is read from ``--map FILE`` (``SlotMap.to_json``, what ``GMCO_SHARD_SLOT_MAP_FILE`` and
``GMCO_ROUTER_SLOT_MAP_FILE`` take) or is the even map of ``--shards N``.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from pathlib import Path

import click
from gmco_common.slots import NUM_SLOTS, SlotMap


def ranges(slots: Iterable[int]) -> str:
    """``[0, 1, 2, 7]`` -> ``"0-2,7"``."""
    out: list[str] = []
    run: list[int] = []
    for s in sorted(slots):
        if run and s == run[-1] + 1:
            run.append(s)
            continue
        if run:
            out.append(f"{run[0]}-{run[-1]}" if len(run) > 1 else str(run[0]))
        run = [s]
    if run:
        out.append(f"{run[0]}-{run[-1]}" if len(run) > 1 else str(run[0]))
    return ",".join(out)


def parse_ranges(text: str) -> list[int]:
    slots: list[int] = []
    for part in filter(None, (p.strip() for p in text.split(","))):
        low, sep, high = part.partition("-")
        try:
            a, b = int(low), int(high) if sep else int(low)
        except ValueError:
            raise click.BadParameter(f"{part!r} is not a slot or a range like 10-20", param_hint="--slots") from None
        if not 0 <= a <= b < NUM_SLOTS:
            raise click.BadParameter(f"{part!r} is outside 0..{NUM_SLOTS - 1}", param_hint="--slots")
        slots.extend(range(a, b + 1))
    return slots


def load_map(map_file: Path | None, shards: int | None) -> SlotMap:
    if (map_file is None) == (shards is None):
        raise click.UsageError("give one of --map FILE or --shards N")
    if map_file is not None:
        try:
            return SlotMap.from_json(map_file.read_text())
        except (OSError, ValueError, KeyError) as exc:
            raise click.BadParameter(f"{map_file}: not a slot map ({exc})", param_hint="--map") from None
    assert shards is not None
    return SlotMap.even(shards)


def describe(slot_map: SlotMap) -> str:
    owned: dict[int, list[int]] = defaultdict(list)
    for slot, shard in enumerate(slot_map.owner):
        owned[shard].append(slot)
    lines = [f"{NUM_SLOTS} slots over {slot_map.shard_count} shards"]
    for shard in range(slot_map.shard_count):
        slots = owned.get(shard, [])
        lines.append(f"  shard {shard}: {len(slots):>4} slots ({100 * len(slots) / NUM_SLOTS:5.1f}%)  "
                     f"{ranges(slots) or '-'}")
    return "\n".join(lines)


def plan_rebalance(current: SlotMap, shard_count: int) -> tuple[SlotMap, list[tuple[int, int, list[int]]]]:
    """An even map over ``shard_count`` shards reached by moving as few slots as possible, and the moves
    as (from, to, slots). Each shard keeps the slots it has up to its new share; the rest go to the shards
    below theirs."""
    if not 1 <= shard_count <= NUM_SLOTS:
        raise click.BadParameter(f"must be in 1..{NUM_SLOTS}", param_hint="--to-shards")
    quota = [NUM_SLOTS // shard_count + (1 if s < NUM_SLOTS % shard_count else 0) for s in range(shard_count)]
    owner = list(current.owner)
    kept = [0] * shard_count
    surplus: list[int] = []
    for slot, shard in enumerate(owner):
        if shard < shard_count and kept[shard] < quota[shard]:
            kept[shard] += 1
        else:
            surplus.append(slot)
    moves: dict[tuple[int, int], list[int]] = defaultdict(list)
    receivers = iter([s for s in range(shard_count) for _ in range(quota[s] - kept[s])])
    for slot in surplus:
        to = next(receivers)
        moves[(owner[slot], to)].append(slot)
        owner[slot] = to
    return SlotMap(tuple(owner)), [(a, b, slots) for (a, b), slots in sorted(moves.items())]


STEPS = """Steps (docs/resharding.md), with the new map in {out}:
  1. start the receiving shards' replicas with GMCO_SHARD_SLOT_MAP_FILE={out} (new shards: their
     GMCO_SHARD_SHARD_ID, GMCO_SHARD_SHARD_COUNT={count}); they tail the log for their new slots
  2. wait until they have caught up: gmco stats (lag 0 on every replica)
  3. roll the routers to GMCO_ROUTER_SLOT_MAP_FILE={out}
  4. roll the giving shards' replicas to GMCO_SHARD_SLOT_MAP_FILE={out}; their copies of the moved slots
     go at their next compaction"""


@click.group("slots")
def slots() -> None:
    """Show the slot map, plan a rebalance or move slots (slot = xxh64(media_id) % 4096)."""


_map = click.option("--map", "map_file", type=click.Path(exists=True, dir_okay=False, path_type=Path),
                    help="a slot map JSON file (SlotMap.to_json)")
_shards = click.option("--shards", type=click.IntRange(1, NUM_SLOTS), help="or: the even map of N shards")
_out = click.option("--out", type=click.Path(dir_okay=False, path_type=Path), default=None,
                    help="write the new map here (JSON); without it, only the plan is printed")


@slots.command("show")
@_map
@_shards
def show(map_file: Path | None, shards: int | None) -> None:
    """How many slots each shard owns, and which."""
    click.echo(describe(load_map(map_file, shards)))


@slots.command("plan")
@_map
@_shards
@click.option("--to-shards", type=int, required=True, help="the shard count to rebalance onto")
@_out
def plan(map_file: Path | None, shards: int | None, to_shards: int, out: Path | None) -> None:
    """Plan the fewest slot moves that spread the slots evenly over --to-shards shards."""
    current = load_map(map_file, shards)
    target, moves = plan_rebalance(current, to_shards)
    moved = sum(len(s) for _, _, s in moves)
    click.echo(f"{moved} of {NUM_SLOTS} slots move ({100 * moved / NUM_SLOTS:.1f}%)")
    for a, b, slot_list in moves:
        click.echo(f"  shard {a} -> shard {b}: {len(slot_list)} slots  {ranges(slot_list)}")
    click.echo(describe(target))
    if out is not None:
        out.write_text(target.to_json())
        click.echo(f"new map written to {out}")
    if moves:
        click.echo(STEPS.format(out=out or "<the new map file>", count=target.shard_count))


@slots.command("move")
@_map
@_shards
@click.option("--slots", "slot_text", required=True, help="slots to move: '0-99,200'")
@click.option("--to", "to_shard", type=click.IntRange(0, NUM_SLOTS - 1), required=True, help="the receiving shard")
@_out
def move(map_file: Path | None, shards: int | None, slot_text: str, to_shard: int, out: Path | None) -> None:
    """Reassign some slots to one shard."""
    current = load_map(map_file, shards)
    chosen = parse_ranges(slot_text)
    if to_shard > current.shard_count:
        raise click.BadParameter(f"shard {to_shard} would leave shard {current.shard_count} empty: shard ids are "
                                 "consecutive", param_hint="--to")
    target = current.move(chosen, to_shard)
    moved = [s for s in chosen if current.owner[s] != to_shard]
    click.echo(f"{len(moved)} slots move to shard {to_shard}: {ranges(moved) or '-'}")
    click.echo(describe(target))
    if out is not None:
        out.write_text(target.to_json())
        click.echo(f"new map written to {out}")
    if moved:
        click.echo(STEPS.format(out=out or "<the new map file>", count=target.shard_count))
