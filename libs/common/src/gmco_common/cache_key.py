"""The context part of a cached recommendation list's key: one function, used by the router (which reads
and writes lists) and by the warmer (which writes them), so that a warmed entry is the one a request reads.

    rec:v2:{<user_id>}:<context_hash>:<user_version>      (the cache service's key; see gmco_cache.keys)

``context_hash`` covers everything a list depends on besides the user and the user's state version: the
request context (surface, region, device, rating ceiling, anchor item), the preferences (blocked and allowed
genres, order-insensitive) and k. It is a BLAKE2b-96 of their canonical bytes, then ``:k<k>``.
"""

from __future__ import annotations

import hashlib

from gmco.common.v1 import common_pb2


def context_key(context: common_pb2.RequestContext, preferences: common_pb2.UserPreferences) -> str:
    """A stable hash of the context and the (order-insensitive) preferences; also the compiled-filter key."""
    prefs = common_pb2.UserPreferences(blocked_genres=sorted(set(preferences.blocked_genres)),
                                       allowed_genres=sorted(set(preferences.allowed_genres)))
    digest = hashlib.blake2b(digest_size=12)
    digest.update(context.SerializeToString(deterministic=True))
    digest.update(b"\x00")
    digest.update(prefs.SerializeToString(deterministic=True))
    return digest.hexdigest()


def context_hash(context: common_pb2.RequestContext, preferences: common_pb2.UserPreferences, k: int) -> str:
    return f"{context_key(context, preferences)}:k{k}"
