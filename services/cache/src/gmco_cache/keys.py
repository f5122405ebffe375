"""The key schema and input validation.

    rec:v2:{<user_id>}:<context_hash>:<user_version>   recommendations (RecommendationList bytes)
    emb:user:{<user_id>}                                user vectors
    emb:media:{<media_id>}                              media vectors
    lock:rec:v2:{<user_id>}:<context_hash>:<version>    fill lock of one recommendations key

Redis Cluster hashes only the text between the first ``{`` and the next ``}``, so every key of a user
(and the fill lock of each) lives in the same slot, on the same node. A user id containing a brace
would move its tag, so it is refused. Invalidation is by version: a bumped user-state version gives a
new key, and the old entry is never read again and expires by its TTL. Nothing ever enumerates keys
(no SCAN, no KEYS).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from gmco.cache.v1 import cache_service_pb2 as pb
from gmco_common.errors import InvalidArgument

MAX_KEY_PART_BYTES = 512


class Keyspace(enum.Enum):
    """A keyspace; ``value`` is the label used in metrics."""

    RECOMMENDATIONS = "recommendations"
    USER_VECTOR = "user_vector"
    MEDIA_VECTOR = "media_vector"


_FROM_PROTO = {
    pb.KEYSPACE_RECOMMENDATIONS: Keyspace.RECOMMENDATIONS,
    pb.KEYSPACE_USER_VECTOR: Keyspace.USER_VECTOR,
    pb.KEYSPACE_MEDIA_VECTOR: Keyspace.MEDIA_VECTOR,
}


@dataclass(frozen=True, slots=True)
class Key:
    keyspace: Keyspace
    redis_key: str

    @property
    def lock_key(self) -> str:
        """The fill lock of this key: same hash tag, so same slot."""
        return f"lock:{self.redis_key}"


def _part(value: str, field: str) -> str:
    if not value:
        raise InvalidArgument(field, "must not be empty")
    if len(value.encode()) > MAX_KEY_PART_BYTES:
        raise InvalidArgument(field, f"longer than {MAX_KEY_PART_BYTES} bytes")
    return value


def _user(user_id: str, field: str) -> str:
    _part(user_id, field)
    if "{" in user_id or "}" in user_id:
        raise InvalidArgument(field, "must not contain '{' or '}' (they would move the key's hash tag)")
    return user_id


def recommendations_key(user_id: str, context_hash: str, user_version: int, field_prefix: str = "") -> Key:
    user = _user(user_id, f"{field_prefix}user_id")
    context = _part(context_hash, f"{field_prefix}context_hash")
    return Key(Keyspace.RECOMMENDATIONS, f"rec:v2:{{{user}}}:{context}:{user_version}")


def user_vector_key(user_id: str, field_prefix: str = "") -> Key:
    return Key(Keyspace.USER_VECTOR, f"emb:user:{{{_user(user_id, f'{field_prefix}user_id')}}}")


def media_vector_key(media_id: int) -> Key:
    """Any uint64 is a media id (0 included), so there is nothing to refuse."""
    return Key(Keyspace.MEDIA_VECTOR, f"emb:media:{{{media_id}}}")


def key_from_proto(key: pb.CacheKey, field: str) -> Key:
    """Validate a ``CacheKey``; errors name ``field`` (e.g. ``keys[3].user_id``)."""
    keyspace = _FROM_PROTO.get(key.keyspace)
    if keyspace is None:
        known = ", ".join(pb.Keyspace.Name(k) for k in _FROM_PROTO)
        raise InvalidArgument(f"{field}.keyspace", f"unknown keyspace {key.keyspace}; use one of {known}")
    if keyspace is Keyspace.RECOMMENDATIONS:
        return recommendations_key(key.user_id, key.context_hash, key.user_version, f"{field}.")
    if keyspace is Keyspace.USER_VECTOR:
        return user_vector_key(key.user_id, f"{field}.")
    return media_vector_key(key.media_id)


def check_value(value: bytes, field: str, max_bytes: int) -> bytes:
    if len(value) > max_bytes:
        raise InvalidArgument(field, f"{len(value)} bytes is over the limit of {max_bytes} "
                                     "(GMCO_CACHE_MAX_VALUE_BYTES)")
    return value


def check_batch(size: int, field: str, max_keys: int) -> None:
    if size == 0:
        raise InvalidArgument(field, "must not be empty")
    if size > max_keys:
        raise InvalidArgument(field, f"{size} entries is over the limit of {max_keys} (GMCO_CACHE_MAX_BATCH_KEYS)")
