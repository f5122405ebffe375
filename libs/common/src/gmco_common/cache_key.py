"""The context part of a cached recommendation list's key: one function, used by the router (which reads
and writes lists) and by the warmer (which writes them), so that a warmed entry is the one a request reads.

    rec:v2:{<user_id>}:<context_hash>:<user_version>      (the cache service's key; see gmco_cache.keys)

``context_hash`` covers everything a list depends on besides the user and the user's state version: the
request context (surface, region, device, rating ceiling, anchor item), the preferences (blocked and allowed
genres, order-insensitive) and k. It is a BLAKE2b-96 of their canonical bytes, then ``:k<k>``.

The hash is taken over the context *after* the router's defaults are filled in (:func:`with_defaults`): a
request that leaves out the surface, region or device and one that names the default values share a key.
The ontology's ``ResolveConstraintsResponse.context_hash`` is deprecated and is not this value.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from gmco.common.v1 import common_pb2


@dataclass(frozen=True)
class ContextDefaults:
    """What the router puts into a context that names no surface, region or device
    (``GMCO_ROUTER_DEFAULT_SURFACE``, ``_REGION``, ``_DEVICE``)."""

    surface: str = "HOMEPAGE"
    region: str = "US"
    device: str = "smart_tv"


DEFAULTS = ContextDefaults()


def with_defaults(context: common_pb2.RequestContext,
                  defaults: ContextDefaults = DEFAULTS) -> common_pb2.RequestContext:
    """``context`` with the empty surface, region and device set from ``defaults`` (a modified copy)."""
    out = common_pb2.RequestContext()
    out.CopyFrom(context)
    if out.surface == common_pb2.SURFACE_UNSPECIFIED:
        out.surface = common_pb2.Surface.Value(f"SURFACE_{defaults.surface}")
    if not out.region:
        out.region = defaults.region
    if not out.device:
        out.device = defaults.device
    return out


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
    """The cache key's context part of a list of ``k`` items for this (defaulted) context and preferences."""
    return f"{context_key(context, preferences)}:k{k}"
