"""gmco-shard: one slice of the catalogue's embeddings and its ANN index. ``--help`` lists settings."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sys

import numpy as np
from gmco.shard.v1 import shard_service_pb2, shard_service_pb2_grpc
from gmco_catalog.log import open_log
from gmco_catalog.tailer import LogTailer
from gmco_common.cli import run_service
from gmco_common.server import Registration, serve_until_signal, start_server
from gmco_common.slots import NUM_SLOTS

from gmco_shard import config
from gmco_shard.gpu import GpuMonitor, HealthGate, cuda_probe
from gmco_shard.index.base import backend_class
from gmco_shard.loader import initial_load, slot_map
from gmco_shard.servicer import ShardServicer
from gmco_shard.snapshot import save_snapshot
from gmco_shard.store import ShardStore

log = logging.getLogger("gmco_shard")
SERVICE = shard_service_pb2.DESCRIPTOR.services_by_name["ShardService"].full_name


async def _every(seconds: float, fn) -> None:
    while True:
        await asyncio.sleep(seconds)
        await fn()


async def run(settings: config.Settings) -> None:
    backend_class(settings.index_backend)  # fail fast when the backend's extra is missing
    store = ShardStore(settings.dim, settings.index_backend, settings.index_params(), settings.exact_fraction)
    slots = slot_map(settings).slots_for(settings.shard_id)
    store.owned_slots = np.zeros(NUM_SLOTS, bool)
    store.owned_slots[slots] = True
    async with contextlib.AsyncExitStack() as stack:
        catalog = await stack.enter_async_context(open_log(settings.catalog_dsn)) if settings.catalog_dsn else None
        tailer = None
        servicer = ShardServicer(store, settings, slots)
        running = await start_server(settings, [Registration(
            shard_service_pb2_grpc.add_ShardServiceServicer_to_server, servicer, SERVICE)])
        stack.push_async_callback(running.server.stop, 0)  # also when loading fails
        # Until the data is loaded, health answers NOT_SERVING and data RPCs UNAVAILABLE.
        servicer.loading = True
        await running.set_serving(False)
        log.info("loaded %s", await asyncio.to_thread(initial_load, store, settings, slots))
        servicer.loading = False
        tasks = []
        if catalog is not None:
            tailer = LogTailer(catalog, slots, _applier(store), store.applied_lsn)
            servicer.tailer = tailer
            tasks.append(asyncio.create_task(tailer.run()))
        if settings.snapshot_dir is not None and settings.snapshot_interval_seconds > 0:
            tasks.append(asyncio.create_task(_every(settings.snapshot_interval_seconds, lambda: asyncio.to_thread(
                save_snapshot, store, settings.snapshot_dir))))
        gpu = GpuMonitor() if settings.index_backend == "cuvs" else None
        gate = HealthGate(cuda_probe) if gpu is not None else None

        async def refresh() -> None:
            servicer.refresh_metrics()
            if gpu is not None and gate is not None:
                gpu.refresh()
                was = gate.healthy
                if await asyncio.to_thread(gate.check) != was:
                    log.warning("CUDA context %s", "usable again" if gate.healthy else "unusable: NOT_SERVING")
                    await running.set_serving(gate.healthy)

        tasks.append(asyncio.create_task(_every(1.0, refresh)))
        await running.set_serving(True)
        try:
            await serve_until_signal(running, settings.grace_seconds)
        finally:
            for t in tasks:
                t.cancel()


def _applier(store: ShardStore):
    from gmco_shard.apply import apply_entries

    async def apply(entries, scanned_lsn):
        await asyncio.to_thread(apply_entries, store, entries, scanned_lsn)

    return apply


def main(argv: list[str] | None = None) -> int:
    return run_service("shard", __doc__, config.Settings, config.PREFIX, run, argv)

if __name__ == "__main__":
    sys.exit(main())
