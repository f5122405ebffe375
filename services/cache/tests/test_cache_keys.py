"""Unit tests of the key schema: formats, hash tags (one slot per user) and validation."""

from __future__ import annotations

import pytest
from gmco.cache.v1 import cache_service_pb2 as pb
from gmco_cache.keys import (
    Keyspace,
    check_batch,
    check_value,
    key_from_proto,
    media_vector_key,
    recommendations_key,
    user_vector_key,
)
from gmco_common.errors import InvalidArgument
from redis.crc import key_slot


def test_formats() -> None:
    assert recommendations_key("u42", "ab12", 7).redis_key == "rec:v2:{u42}:ab12:7"
    assert user_vector_key("u42").redis_key == "emb:user:{u42}"
    assert media_vector_key(9001).redis_key == "emb:media:{9001}"
    assert media_vector_key(0).redis_key == "emb:media:{0}"


def test_one_user_one_slot_lock_included() -> None:
    rec = recommendations_key("alice", "home:US:tv", 3)
    slots = {key_slot(k.encode()) for k in (rec.redis_key, rec.lock_key, user_vector_key("alice").redis_key,
                                            recommendations_key("alice", "other", 4).redis_key)}
    assert len(slots) == 1
    assert key_slot(b"emb:media:{5}") == key_slot(b"5")  # media keys are tagged by the media id


def test_version_changes_the_key() -> None:
    assert recommendations_key("u", "c", 1) != recommendations_key("u", "c", 2)


@pytest.mark.parametrize(("call", "field"), [
    (lambda: recommendations_key("", "c", 1), "user_id"),
    (lambda: recommendations_key("u", "", 1), "context_hash"),
    (lambda: recommendations_key("a{b}", "c", 1), "user_id"),
    (lambda: user_vector_key("x" * 600), "user_id"),
    (lambda: key_from_proto(pb.CacheKey(keyspace=pb.KEYSPACE_USER_VECTOR), "keys[2]"), "keys[2].user_id"),
    (lambda: key_from_proto(pb.CacheKey(user_id="u"), "keys[0]"), "keys[0].keyspace"),
    (lambda: key_from_proto(pb.CacheKey(keyspace=99, user_id="u"), "keys[1]"), "keys[1].keyspace"),
    (lambda: check_value(b"x" * 11, "entries[0].value", 10), "entries[0].value"),
    (lambda: check_batch(0, "keys", 10), "keys"),
    (lambda: check_batch(11, "keys", 10), "keys"),
])
def test_bad_input_names_the_field(call, field: str) -> None:
    with pytest.raises(InvalidArgument) as err:
        call()
    assert err.value.field == field


def test_from_proto() -> None:
    key = key_from_proto(pb.CacheKey(keyspace=pb.KEYSPACE_RECOMMENDATIONS, user_id="u", context_hash="c",
                                     user_version=5), "keys[0]")
    assert key.keyspace is Keyspace.RECOMMENDATIONS and key.redis_key == "rec:v2:{u}:c:5"
    assert key_from_proto(pb.CacheKey(keyspace=pb.KEYSPACE_MEDIA_VECTOR, media_id=3), "k").redis_key == "emb:media:{3}"
