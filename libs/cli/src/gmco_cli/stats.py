"""``gmco stats``: every shard replica's counts, lag, index and backend, and every service's health."""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path
from typing import Any

import click

from gmco_cli.targets import HEALTH, Target, resolve, target_options

SHARD_COLUMNS = ("replica", "items", "sealed", "growing", "tombstones", "applied_lsn", "lag", "lag_s", "backend",
                 "index_mb", "generation", "slots", "health")


async def _health(channel: Any, service: str, timeout: float) -> str:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    try:
        reply = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=service),
                                                                timeout=timeout)
    except grpc.aio.AioRpcError as exc:
        return exc.code().name
    return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)


async def collect(targets: list[Target], timeout: float) -> list[dict[str, Any]]:
    """One row per target: its health and, for a shard replica, its GetStats."""
    import grpc
    from gmco.shard.v1 import shard_service_pb2, shard_service_pb2_grpc

    async def one(t: Target) -> dict[str, Any]:
        row: dict[str, Any] = {"name": t.name, "kind": t.kind, "address": t.address}
        if t.metrics_url:
            row["metrics_url"] = t.metrics_url
        async with grpc.aio.insecure_channel(t.address) as channel:
            row["health"] = await _health(channel, HEALTH[t.kind], timeout)
            if t.kind == "shard":
                try:
                    s = await shard_service_pb2_grpc.ShardServiceStub(channel).GetStats(
                        shard_service_pb2.GetStatsRequest(), timeout=timeout)
                except grpc.aio.AioRpcError as exc:
                    row["error"] = f"{exc.code().name}: {exc.details()}"
                else:
                    row.update(shard_id=s.shard_id, replica_id=s.replica_id, items=s.item_count,
                               sealed=s.sealed_count, growing=s.growing_count, tombstones=s.tombstone_count,
                               dimension=s.dimension, backend=s.index_backend, index_bytes=s.index_bytes,
                               vector_bytes=s.vector_bytes, applied_lsn=s.applied_lsn, lag_entries=s.lag_entries,
                               lag_seconds=round(s.lag_seconds, 3), compacting=s.compacting,
                               generation=s.index_generation, slots=len(s.slots), segments=s.segment_count)
        return row

    return list(await asyncio.gather(*(one(t) for t in targets)))


def render(rows: list[dict[str, Any]]) -> str:
    shards = [r for r in rows if r["kind"] == "shard"]
    others = [r for r in rows if r["kind"] != "shard"]
    lines = []
    if shards:
        table = [SHARD_COLUMNS]
        for r in sorted(shards, key=lambda r: r["name"]):
            if "items" not in r:
                table.append((r["name"], *("-" * 11), r["health"] + (f" ({r['error']})" if "error" in r else "")))
                continue
            table.append((r["name"], f"{r['items']:,}", f"{r['sealed']:,}", f"{r['growing']:,}", f"{r['tombstones']:,}",
                          str(r["applied_lsn"]), str(r["lag_entries"]), f"{r['lag_seconds']:g}",
                          r["backend"] + (" (compacting)" if r["compacting"] else ""),
                          f"{r['index_bytes'] / 2**20:.1f}", str(r["generation"]), str(r["slots"]), r["health"]))
        widths = [max(len(row[i]) for row in table) for i in range(len(SHARD_COLUMNS))]
        lines += ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip() for row in table]
        total = sum(r.get("items", 0) for r in shards if r.get("replica_id", 0) == 0)
        lines.append(f"items (replica 0 of each shard): {total:,}")
        lines.append("")
    width = max((len(r["name"]) for r in others), default=0)
    for r in sorted(others, key=lambda r: r["name"]):
        extra = f"  metrics {r['metrics_url']}" if r.get("metrics_url") else ""
        lines.append(f"{r['name'].ljust(width)}  {r['address']:<21}  {r['health']}{extra}")
    return "\n".join(lines)


@click.command("stats")
@target_options
@click.option("--json", "as_json", is_flag=True, help="print the rows as JSON instead of a table")
@click.option("--timeout", type=click.FloatRange(0, min_open=True), default=3.0, show_default=True,
              help="seconds per call")
def stats(stack: Path | None, shards: str | None, router: str | None, cache: str | None, ontology: str | None,
          rl_state: str | None, as_json: bool, timeout: float) -> None:
    """Every shard replica's item counts, applied lsn and lag, index backend and size, and every service's
    health (grpc.health.v1). Exit status 1 when anything is not SERVING."""
    targets = resolve(stack, shards, router, cache, ontology, rl_state)
    rows = asyncio.run(collect(targets, timeout))
    click.echo(json.dumps(rows, indent=2) if as_json else render(rows))
    sys.exit(0 if all(r["health"] == "SERVING" and "error" not in r for r in rows) else 1)
