"""Versioned schema migrations: ``migrations/<dialect>/NNNN_name.sql``, applied in order at start.

Each store records what it applied in ``schema_migrations`` and applies only what is missing, inside
one transaction (PostgreSQL also takes an advisory lock, so replicas starting together do not race).
Applying twice is a no-op.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from importlib import resources

_NAME = re.compile(r"^(\d{4})_([a-z0-9_]+)\.sql$")

MIGRATIONS_TABLE = "schema_migrations"


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    sql: str


def load_migrations(dialect: str) -> list[Migration]:
    """The migrations of ``dialect`` ('postgres' or 'sqlite'), by version."""
    found = []
    for entry in resources.files("gmco_rl_state.migrations").joinpath(dialect).iterdir():
        match = _NAME.match(entry.name)
        if match:
            found.append(Migration(int(match.group(1)), match.group(2), entry.read_text(encoding="utf-8")))
    found.sort(key=lambda m: m.version)
    versions = [m.version for m in found]
    if not found or versions != list(range(1, len(found) + 1)):
        raise RuntimeError(f"migrations for {dialect} must be numbered 0001.. without gaps; found {versions}")
    return found


def pending(migrations: list[Migration], applied: set[int]) -> list[Migration]:
    return [m for m in migrations if m.version not in applied]
