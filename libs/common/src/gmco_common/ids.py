"""Identifiers: their documented bounds, and how uint64 media ids are stored in signed 64-bit columns.

Bounds (every service enforces the same ones, and the protos document them):

- ``user_id``: 1..256 characters, no ``{`` or ``}`` (the cache uses ``{user}`` as its Redis hash tag).
- ``event_id`` and ``request_id``: 1..256 characters.
- ``media_id``: any uint64.
- names in a request context or preferences (``region``, ``device``, ``max_rating``, genre names):
  at most :data:`MAX_NAME_CHARS` characters; at most :data:`MAX_PREFERENCE_GENRES` genres in each of
  ``allowed_genres`` and ``blocked_genres``.
- repeated fields of one call: at most :data:`MAX_FEEDBACK_EVENTS` events in ``RecordFeedback``,
  :data:`MAX_WRITE_ITEMS` items in ``UpsertMedia`` and :data:`MAX_DELETE_IDS` ids in ``DeleteMedia``
  (the router's ``GMCO_ROUTER_MAX_*`` settings may lower them); :data:`MAX_RANK_BATCH` entries in
  rl_state's ``RankBatch``.

Error messages never echo more than :data:`ECHO_CHARS` characters of what the caller sent.
"""

from __future__ import annotations

from gmco_common.errors import InvalidArgument, echo

MAX_ID_CHARS = 256
MAX_NAME_CHARS = 64
MAX_PREFERENCE_GENRES = 64
MAX_FEEDBACK_EVENTS = 1000
MAX_WRITE_ITEMS = 1000
MAX_DELETE_IDS = 10_000
MAX_RANK_BATCH = 64  # the router's RankBatch calls carry at most this many entries too
_I64 = 1 << 63


def check_id(value: str, field: str, required: bool = True, limit: int = MAX_ID_CHARS) -> str:
    """``value`` when it is a valid id; INVALID_ARGUMENT naming ``field`` otherwise."""
    if not value:
        if required:
            raise InvalidArgument(field, "is required")
        return value
    if len(value) > limit:
        raise InvalidArgument(field, f"is {len(value)} characters long; at most {limit} ({echo(value)})")
    return value


def check_name(value: str, field: str) -> str:
    """An optional short name (a region, device, rating or genre): at most :data:`MAX_NAME_CHARS`."""
    return check_id(value, field, required=False, limit=MAX_NAME_CHARS)


def check_count(values: object, field: str, limit: int, required: bool = True) -> None:
    """INVALID_ARGUMENT naming ``field`` when a repeated field is empty (and required) or longer than ``limit``."""
    n = len(values)  # type: ignore[arg-type]
    if n == 0 and required:
        raise InvalidArgument(field, "is empty")
    if n > limit:
        raise InvalidArgument(field, f"has {n} entries; at most {limit} in one call (split it)")


def check_user_id(value: str, field: str = "user_id") -> str:
    check_id(value, field)
    if "{" in value or "}" in value:
        raise InvalidArgument(field, f"must not contain '{{' or '}}' ({echo(value)})")
    return value


def to_int64(media_id: int) -> int:
    """A uint64 id as the int64 with the same bits (PostgreSQL and SQLite have signed 64-bit integers)."""
    return media_id - (1 << 64) if media_id >= _I64 else media_id


def from_int64(value: int) -> int:
    return value + (1 << 64) if value < 0 else value
