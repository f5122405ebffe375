"""The durable catalogue change log and the replica tailer. :func:`open_log` opens the log a DSN names."""

from __future__ import annotations

from gmco_catalog.log import CatalogLog


def open_log(url: str) -> CatalogLog:
    """``postgresql://...`` -> PostgreSQL; ``sqlite:///path`` or a plain path -> SQLite (imported lazily, so
    a process that only reads SQLite, or none, never loads psycopg)."""
    if url.startswith(("postgresql://", "postgres://")):
        from gmco_catalog.postgres_log import PostgresCatalogLog

        return PostgresCatalogLog(url)
    from gmco_catalog.sqlite_log import SqliteCatalogLog

    return SqliteCatalogLog(url.removeprefix("sqlite://"))
