"""Identifiers: their documented bounds, and how uint64 media ids are stored in signed 64-bit columns.

Bounds (every service enforces the same ones, and the protos document them):

- ``user_id``: 1..256 characters, no ``{`` or ``}`` (the cache uses ``{user}`` as its Redis hash tag).
- ``event_id`` and ``request_id``: 1..256 characters.
- ``media_id``: any uint64.

Error messages never echo more than :data:`ECHO_CHARS` characters of what the caller sent.
"""

from __future__ import annotations

from gmco_common.errors import InvalidArgument, echo

MAX_ID_CHARS = 256
_I64 = 1 << 63


def check_id(value: str, field: str, required: bool = True) -> str:
    """``value`` when it is a valid id; INVALID_ARGUMENT naming ``field`` otherwise."""
    if not value:
        if required:
            raise InvalidArgument(field, "is required")
        return value
    if len(value) > MAX_ID_CHARS:
        raise InvalidArgument(field, f"is {len(value)} characters long; at most {MAX_ID_CHARS} ({echo(value)})")
    return value


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
