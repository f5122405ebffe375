"""The gmco admin command against the local stack: stats of every replica and service, an import that the
replicas apply and that read-your-writes sees."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import grpc
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from gmco.common.v1 import common_pb2
from gmco.router.v1 import router_service_pb2 as pb
from gmco.shard.v1 import shard_service_pb2, shard_service_pb2_grpc
from gmco_stack.stack import Stack

pytestmark = pytest.mark.e2e


def gmco(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "gmco_cli", *args], capture_output=True, text=True,
                          timeout=timeout, check=False)


def test_stats_reads_every_replica_and_service(stack: Stack) -> None:
    done = gmco("stats", "--stack", str(stack.config.run_dir), "--json")
    assert done.returncode == 0, done.stdout + done.stderr
    rows = {r["name"]: r for r in json.loads(done.stdout)}
    dim, items = stack.config.dim, stack.config.items
    assert set(rows) == {n for n in stack.services if n != "envoy"}
    assert all(r["health"] == "SERVING" for r in rows.values())
    shards = [r for r in rows.values() if r["kind"] == "shard"]
    assert sum(r["items"] for r in shards) >= items
    assert {r["shard_id"] for r in shards} == set(range(stack.config.shards))
    assert all(r["dimension"] == dim and r["backend"] and r["slots"] == 4096 // stack.config.shards
               for r in shards)
    table = gmco("stats", "--stack", str(stack.config.run_dir))
    assert table.returncode == 0 and "applied_lsn" in table.stdout and "metrics http://" in table.stdout


def test_import_is_applied_by_every_replica_and_read_your_writes_sees_it(stack: Stack, envoy,
                                                                        tmp_path: Path) -> None:
    n, first, dim = 3000, 7 * 10**11, stack.config.dim
    anchor, twin = first + 42, first + 43
    rng = np.random.default_rng(5)
    vectors = rng.standard_normal((n, dim)).astype(np.float32)
    vectors[twin - first] = vectors[anchor - first]  # the twin is the anchor's nearest neighbour
    popularity = np.zeros(n, np.float32)
    popularity[twin - first] = 1000.0
    pq.write_table(pa.table({
        "id": pa.array(np.arange(first, first + n, dtype=np.uint64)),
        "emb": pa.array(vectors.tolist(), pa.list_(pa.float32())),
        "genre_ids": pa.array([[1]] * n, pa.list_(pa.uint32())), "region_mask": pa.array([0xFF] * n, pa.uint64()),
        "format_mask": pa.array([0xFF] * n, pa.uint64()), "popularity": pa.array(popularity),
    }), tmp_path / "items.parquet")
    shards = [s.target for s in stack.shard_services]
    done = gmco("import", str(tmp_path / "items.parquet"), "--catalog-dsn", stack.catalog_dsn, "--dim", str(dim),
                "--id-column", "id", "--vector-column", "emb", "--batch-size", "1000", "--state",
                str(tmp_path / "state.json"), *(a for t in shards for a in ("--wait-for", t)))
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"imported {n} items" in done.stdout and "every replica applied lsn" in done.stdout
    last_lsn = int(done.stdout.split("last lsn ")[1].split(";")[0])
    found = 0
    for target in shards:
        with grpc.insecure_channel(target) as ch:
            got = shard_service_pb2_grpc.ShardServiceStub(ch).GetMedia(
                shard_service_pb2.GetMediaRequest(media_ids=list(range(first, first + n, 100))), timeout=5)
        found += len(got.items)
    assert found == n // 100
    # A video page on an imported item, asked with min_lsn = the import's last lsn, finds its imported twin.
    reply = envoy.Recommend(pb.RecommendRequest(
        user_id="import-reader", k=5, min_lsn=last_lsn, skip_cache=True,
        context=common_pb2.RequestContext(surface=common_pb2.SURFACE_VIDEO_PAGE, anchor_media_id=anchor)),
        metadata=[("x-user-id", "import-reader")], timeout=10)
    assert not reply.degraded, reply.degraded_components
    assert twin in [i.media_id for i in reply.items]
