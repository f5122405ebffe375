"""How a shard replica starts: settings -> store (its slots) -> catalogue log -> servicer -> server, then
the initial load (health NOT_SERVING, data RPCs UNAVAILABLE until it is done), then the supervised
background work: the log tailer (must run), periodic snapshots, metric refreshes and, on a GPU, the CUDA
health gate."""

from __future__ import annotations

import asyncio
import contextlib
import logging

from gmco.shard.v1 import shard_service_pb2, shard_service_pb2_grpc
from gmco_catalog import open_log
from gmco_common.server import Health, Registration, RunningServer, start_server
from gmco_common.supervisor import Supervisor

from gmco_shard.config import Settings
from gmco_shard.gpu import GpuMonitor, HealthGate, cuda_probe
from gmco_shard.index.base import backend_class
from gmco_shard.loader import initial_load, slot_map
from gmco_shard.planner import Planner
from gmco_shard.replication import Replication
from gmco_shard.servicer import ShardServicer
from gmco_shard.snapshot import save_snapshot
from gmco_shard.store import MAINTENANCE_THREADS, ShardStore

log = logging.getLogger("gmco_shard")
SERVICE = shard_service_pb2.DESCRIPTOR.services_by_name["ShardService"].full_name


async def start(settings: Settings, stack: contextlib.AsyncExitStack) -> RunningServer:
    """Start the replica on ``stack``; returns once its data is loaded and it is SERVING."""
    backend = backend_class(settings.index_backend)  # fail fast when the backend's extra is missing
    log.info("index backend %s (%s.%s%s)", settings.index_backend, backend.__module__, backend.__name__,
             ", on the GPU" if backend.on_gpu else "")
    owners = slot_map(settings)
    slots = sorted(s for shard in settings.hosted_shards for s in owners.slots_for(shard))
    store = ShardStore(settings.dim, settings.index_backend, settings.index_params(),
                       Planner(settings.planner_costs()), owned_slots=slots, seal_rows=settings.seal_rows,
                       merge_factor=settings.merge_factor, purge_fraction=settings.purge_fraction,
                       maintenance_threads=settings.maintenance_threads or MAINTENANCE_THREADS,
                       defer_max_rows=settings.bulk_defer_max_rows)
    catalog = await stack.enter_async_context(open_log(settings.catalog_dsn)) if settings.catalog_dsn else None
    health = Health()
    await health.set_condition("loading", False)
    background = await stack.enter_async_context(Supervisor(health))
    replication = Replication(catalog, slots, store, settings.bulk_apply_rate) if catalog is not None else None
    servicer = ShardServicer(store, settings, slots, replication, background, owners)
    running = await start_server(settings, [Registration(
        shard_service_pb2_grpc.add_ShardServiceServicer_to_server, servicer, SERVICE)], stack=stack,
        health_state=health)
    running.parts.update(store=store, servicer=servicer, replication=replication, background=background)
    log.info("loaded %s", await asyncio.to_thread(initial_load, store, settings, slots))
    await health.set_condition("loading", True)
    if replication is not None:
        background.keep_running("log-tailer", replication.run)
    if settings.snapshot_dir is not None and settings.snapshot_interval_seconds > 0:
        directory = settings.snapshot_dir
        background.every("snapshot", settings.snapshot_interval_seconds,
                         lambda: asyncio.to_thread(save_snapshot, store, directory))
    background.every("metrics", 1.0, _refresher(servicer, backend.on_gpu, health), first_delay=0)
    servicer.maintain_soon()  # a snapshot may hold frozen rows, or more segments than the merge policy wants
    return running


def _refresher(servicer: ShardServicer, on_gpu: bool, health: Health):
    gpu = GpuMonitor() if on_gpu else None
    gate = HealthGate(cuda_probe) if gpu is not None else None

    async def refresh() -> None:
        servicer.refresh_metrics()
        servicer.maintain_soon()
        if gpu is not None and gate is not None:
            gpu.refresh()
            was = gate.healthy
            if await asyncio.to_thread(gate.check) != was:
                log.warning("CUDA context %s", "usable again" if gate.healthy else "unusable: NOT_SERVING")
            await health.set_condition("cuda", gate.healthy)

    return refresh
