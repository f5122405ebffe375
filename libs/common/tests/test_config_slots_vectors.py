from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from gmco.common.v1 import common_pb2
from gmco_common.config import ConfigError, ServerSettings, load_settings, setting
from gmco_common.errors import InvalidArgument
from gmco_common.slots import NUM_SLOTS, SlotMap, slot_of, slots_of, slots_of_array
from gmco_common.vectors import decode_batch, decode_vector, encode_batch, encode_vector


@dataclasses.dataclass(frozen=True)
class _S(ServerSettings):
    dim: int = setting(1024, check=lambda v: v > 0, check_msg="must be > 0")
    backend: str = setting("exact", choices=("exact", "hnsw"))
    peers: tuple[str, ...] = ()


def test_settings_parse_and_name_the_variable() -> None:
    s = load_settings(_S, "GMCO_X_", {"GMCO_X_PORT": "7", "GMCO_X_PEERS": "a:1, b:2"})
    assert s.port == 7 and s.peers == ("a:1", "b:2") and s.dim == 1024
    with pytest.raises(ConfigError, match="GMCO_X_PORT"):
        load_settings(_S, "GMCO_X_", {"GMCO_X_PORT": "seven"})
    with pytest.raises(ConfigError, match="GMCO_X_DIM"):
        load_settings(_S, "GMCO_X_", {"GMCO_X_DIM": "0"})
    with pytest.raises(ConfigError, match="GMCO_X_BACKEND"):
        load_settings(_S, "GMCO_X_", {"GMCO_X_BACKEND": "annoy"})


def test_slot_map_even_and_move() -> None:
    assert 0 <= slot_of(12345) < NUM_SLOTS
    assert slot_of(12345) == slot_of(12345)
    m = SlotMap.even(3)
    assert m.shard_count == 3
    sizes = [len(m.slots_for(i)) for i in range(3)]
    assert sum(sizes) == NUM_SLOTS and max(sizes) - min(sizes) <= 1
    ids = np.arange(10_000)
    counts = np.bincount(m.shards_of(ids), minlength=3)
    assert counts.min() > 3000  # xxh64 spreads ids evenly
    moved = m.move(m.slots_for(0)[:10], 2)
    assert len(moved.slots_for(2)) == sizes[2] + 10
    assert SlotMap.from_json(moved.to_json()) == moved


def test_vectors_round_trip_and_validation() -> None:
    a = np.random.default_rng(0).standard_normal((3, 8)).astype(np.float32)
    assert np.allclose(decode_batch(encode_batch(a, "float32"), "q"), a)
    assert decode_vector(encode_vector(a[0]), "v", 8).dtype == np.float16
    with pytest.raises(InvalidArgument, match="q.dimension"):
        decode_batch(encode_batch(a), "q", expected_dim=16)
    bad = encode_batch(a)
    bad.data = bad.data[:-2]
    with pytest.raises(InvalidArgument, match="q.data"):
        decode_batch(bad, "q")
    a[1, 2] = np.nan
    with pytest.raises(InvalidArgument, match="NaN"):
        decode_batch(encode_batch(a), "q")
    with pytest.raises(InvalidArgument, match="count"):
        decode_batch(common_pb2.VectorBatch(dtype=1, dimension=8), "q")
    with pytest.raises(InvalidArgument, match="dtype"):
        decode_vector(common_pb2.Vector(data=b"", dtype=9, dimension=1), "v")


def test_vectorised_slots_are_xxh64_like_slot_of() -> None:
    """slots_of_array re-implements XXH64 in numpy: it must agree with the xxhash module on every id,
    the extremes of uint64 included, and slots_of must give the same below and above its numpy cut-over."""
    rng = np.random.default_rng(3)
    ids = np.concatenate([rng.integers(0, 1 << 64, 20_000, dtype=np.uint64, endpoint=False),
                          np.array([0, 1, (1 << 63) - 1, 1 << 63, (1 << 64) - 1], np.uint64)])
    want = [slot_of(m) for m in ids.tolist()]
    assert slots_of_array(ids).tolist() == want
    assert slots_of(ids).tolist() == want and slots_of(ids[:5].tolist()).tolist() == want[:5]
    assert slots_of([]).tolist() == []
