"""The slot map: ``slot = xxh64(media_id) % 4096``; each slot belongs to one shard.

Resharding moves slots between shards; nothing is rehashed. ``SlotMap.even(n)`` gives each shard a
contiguous range of slots, which is the seed design's ``xxh64 % n`` up to a relabelling.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import xxhash

NUM_SLOTS = 4096


def slot_of(media_id: int) -> int:
    """The slot of one media id: xxh64 over its 8 little-endian bytes, seed 0."""
    return xxhash.xxh64_intdigest(int(media_id).to_bytes(8, "little")) % NUM_SLOTS


def slots_of(media_ids: Iterable[int]) -> np.ndarray:
    return np.fromiter((slot_of(m) for m in media_ids), dtype=np.int32)


@dataclass(frozen=True)
class SlotMap:
    """``owner[slot]`` is the shard that holds the slot."""

    owner: tuple[int, ...]

    def __post_init__(self) -> None:
        if len(self.owner) != NUM_SLOTS:
            raise ValueError(f"a slot map has {NUM_SLOTS} entries, got {len(self.owner)}")
        if min(self.owner) < 0:
            raise ValueError("shard ids are >= 0")

    @classmethod
    def even(cls, shard_count: int) -> SlotMap:
        if not 1 <= shard_count <= NUM_SLOTS:
            raise ValueError(f"shard_count must be in 1..{NUM_SLOTS}, got {shard_count}")
        return cls(tuple(slot * shard_count // NUM_SLOTS for slot in range(NUM_SLOTS)))

    @property
    def shard_count(self) -> int:
        return max(self.owner) + 1

    def shard_of(self, media_id: int) -> int:
        return self.owner[slot_of(media_id)]

    @functools.cached_property
    def _owner_array(self) -> np.ndarray:
        return np.asarray(self.owner, dtype=np.int32)

    def shards_of(self, media_ids: Sequence[int]) -> np.ndarray:
        return self._owner_array[slots_of(media_ids)]

    def slots_for(self, shard_id: int) -> list[int]:
        return [s for s, o in enumerate(self.owner) if o == shard_id]

    def move(self, slots: Iterable[int], to_shard: int) -> SlotMap:
        """A new map with ``slots`` reassigned to ``to_shard`` (the unit of resharding)."""
        owner = list(self.owner)
        for s in slots:
            owner[s] = to_shard
        return SlotMap(tuple(owner))

    def to_json(self) -> str:
        return json.dumps({"num_slots": NUM_SLOTS, "owner": list(self.owner)})

    @classmethod
    def from_json(cls, text: str) -> SlotMap:
        doc = json.loads(text)
        return cls(tuple(int(x) for x in doc["owner"]))
