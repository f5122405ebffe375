"""Helpers shared by the rl_state tests: settings, events, requests and the service on port 0."""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import numpy as np
from gmco.common.v1 import common_pb2
from gmco.rl_state.v1 import rl_state_service_pb2 as pb
from gmco.rl_state.v1 import rl_state_service_pb2_grpc
from gmco_common.server import RunningServer
from gmco_common.vectors import encode_batch, encode_vector, normalize
from gmco_rl_state.app import start
from gmco_rl_state.config import Settings
from gmco_rl_state.store import StateStore
from gmco_testing.component import component
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
    """The service through its own ``start``, on port 0, with a real channel."""
    async with component(start, settings) as svc:
        yield Service(svc.stub(rl_state_service_pb2_grpc.RLStateServiceStub), svc.running, svc.parts["store"],
                      settings)


def fresh_database(pg: PostgresServer) -> str:
    return pg.create_database(f"rl_{next(_db_names)}")
