"""Helpers for the shard tests: the service through its own ``start`` over a catalogue directory."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from gmco_common.datagen import Catalogue, save_catalogue
from gmco_shard.app import start
from gmco_shard.config import Settings
from gmco_testing.component import Component, component

DIM = 32
SERVICE = "gmco.shard.v1.ShardService"
# The small test index: what the store fixtures build too.
HNSW = {"hnsw_m": 16, "hnsw_ef_construction": 80, "hnsw_ef_search": 64}


def write_catalogue(cat: Catalogue, directory: Path) -> Path:
    if not (directory / "meta.json").is_file():
        save_catalogue(cat, directory)
    return directory


def shard_settings(data_dir: Path | None, **overrides: Any) -> Settings:
    values: dict[str, Any] = {"port": 0, "dim": DIM, "data_dir": data_dir, **HNSW}
    values.update(overrides)
    return Settings(**values)


@contextlib.asynccontextmanager
async def serve_shard(settings: Settings, send_bytes: int = 1 << 22) -> AsyncIterator[Component]:
    async with component(start, settings, [("grpc.max_send_message_length", send_bytes)]) as svc:
        yield svc
