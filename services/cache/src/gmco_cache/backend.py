"""What the cache needs from a store (the protocol every backend implements; ``app.open_backend`` opens one).

Every backend answers batches: ``get_many`` and ``set_many`` take all the keys of a request at once so
that a Redis backend can send them in a few round trips. TTLs are in milliseconds.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol


class PartialFailure(Exception):
    """Some keys of a batch were served and others failed (one Redis node down, say).

    ``values`` holds the batch's result with the failed positions empty (None, or False for a put).
    """

    def __init__(self, values: list[Any], cause: BaseException) -> None:
        super().__init__(f"part of the batch failed: {cause!r}")
        self.values = values
        self.cause = cause


class Backend(Protocol):
    name: str

    async def get_many(self, keys: Sequence[str]) -> list[bytes | None]:
        """Values in key order; None for a missing key."""

    async def set_many(self, items: Sequence[tuple[str, bytes, int]]) -> None:
        """Store (key, value, ttl_ms) items."""

    async def set_if_absent(self, key: str, value: bytes, ttl_ms: int) -> bool:
        """SET NX PX: True when the key was absent and is now ``value``."""

    async def delete_if_equal(self, key: str, value: bytes | None) -> bool:
        """Delete ``key`` when it holds ``value`` (any value when None); True when deleted."""

    def failed(self) -> None:
        """A call failed or timed out: a backend may refresh its view of the servers (in the background)."""
