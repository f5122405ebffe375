"""Helpers shared by the rl_state tests: settings, events, requests and the service on port 0."""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import grpc
import numpy as np
from gmco.common.v1 import common_pb2
from gmco.rl_state.v1 import rl_state_service_pb2 as pb
from gmco.rl_state.v1 import rl_state_service_pb2_grpc
from gmco_common.server import Registration, RunningServer, start_server
from gmco_common.vectors import encode_batch, encode_vector, normalize
from gmco_rl_state.config import Settings
from gmco_rl_state.servicer import SERVICE_NAME, build_servicer, model_config
from gmco_rl_state.store import StateStore, open_store
from gmco_testing.postgres import PostgresServer

MEDIA_DIM = 64
_db_names = itertools.count()


def make_settings(backend: str, tmp_path: Path, dsn: str | None = None, **overrides: object) -> Settings:
    values: dict[str, object] = {"port": 0, "backend": backend, "postgres_dsn": dsn,
                                 "sqlite_path": tmp_path / "rl.sqlite3", "media_dim": MEDIA_DIM, "bandit_dim": 16,
                                 "db_timeout_seconds": 1.0}
    return Settings(**{**values, **overrides})  # type: ignore[arg-type]


def unit_vectors(n: int, seed: int = 0, dim: int = MEDIA_DIM) -> np.ndarray:
    return normalize(np.random.default_rng(seed).standard_normal((n, dim)))


def event(event_id: str, user: str, media_id: int, reward: float = 1.0, vector: np.ndarray | None = None,
          **kw: object) -> pb.FeedbackEvent:
    ev = pb.FeedbackEvent(event_id=event_id, user_id=user, media_id=media_id, reward=reward,
                          timestamp_unix_ms=1_700_000_000_000, **kw)  # type: ignore[arg-type]
    if vector is not None:
        ev.media_vector.CopyFrom(encode_vector(vector))
    return ev


def rank_request(user: str, ids: list[int], vectors: np.ndarray, k: int, **kw: object) -> pb.RankRequest:
    return pb.RankRequest(user_id=user, candidate_media_ids=ids, candidate_vectors=encode_batch(vectors), k=k,
                          **kw)  # type: ignore[arg-type]


def homepage() -> common_pb2.RequestContext:
    return common_pb2.RequestContext(surface=common_pb2.SURFACE_HOMEPAGE, region="US", device="smart_tv")


@dataclasses.dataclass
class Service:
    stub: rl_state_service_pb2_grpc.RLStateServiceStub
    running: RunningServer
    store: StateStore
    settings: Settings


@asynccontextmanager
async def serve(settings: Settings) -> AsyncIterator[Service]:
    """The service as ``__main__`` wires it, on port 0, with a real channel."""
    async with open_store(settings, model_config(settings).fingerprint()) as store:
        registration = Registration(rl_state_service_pb2_grpc.add_RLStateServiceServicer_to_server,
                                    build_servicer(settings, store), SERVICE_NAME)
        running = await start_server(settings, [registration])
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as channel:
                yield Service(rl_state_service_pb2_grpc.RLStateServiceStub(channel), running, store, settings)
        finally:
            await running.server.stop(0)


def fresh_database(pg: PostgresServer) -> str:
    return pg.create_database(f"rl_{next(_db_names)}")
