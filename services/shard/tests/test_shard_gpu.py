"""GPU health and telemetry logic on CPU (fake probes, a fake NVML), and `gpu` tests of the cuVS backend
that run where an NVIDIA GPU is present (skipped visibly elsewhere; with a GPU but no loadable cuVS they
fail with the loader's error). test_shard_cupy.py runs the device code on CPU stand-ins too."""

from __future__ import annotations

import asyncio
import threading
import time
from types import SimpleNamespace

import numpy as np
import pytest
from gmco_shard import gpu
from gmco_shard.gpu import GpuMonitor, HealthGate


# -- health gate ------------------------------------------------------------------------------------
def test_health_gate_needs_consecutive_failures_and_recovers_at_once() -> None:
    answers = iter([True, False, True, False, False, False, True])
    gate = HealthGate(lambda: next(answers), failures=2)
    assert [gate.check() for _ in range(7)] == [True, True, True, True, False, False, True]


def test_a_raising_probe_counts_as_failed() -> None:
    def probe() -> bool:
        raise RuntimeError("cudaErrorLaunchFailure")

    gate = HealthGate(probe, failures=1)
    assert gate.check() is False


def test_a_hung_probe_fails_after_the_timeout_and_is_not_stacked() -> None:
    release = threading.Event()
    started: list[int] = []

    def probe() -> bool:
        started.append(1)
        release.wait(10)
        return True

    gate = HealthGate(probe, failures=2, timeout=0.05)
    assert gate.check() is True  # first timeout: one failure, still healthy
    assert gate.check() is False  # the probe is still stuck: fails at once, no second probe started
    assert len(started) == 1
    release.set()
    for _ in range(500):  # once the stuck probe ends, the next check runs a fresh one, which succeeds
        if gate.check():
            break
        time.sleep(0.01)
    assert gate.healthy and len(started) == 2


def test_bad_gate_settings_are_refused() -> None:
    with pytest.raises(ValueError):
        HealthGate(lambda: True, failures=0)
    with pytest.raises(ValueError):
        HealthGate(lambda: True, timeout=0)


# -- telemetry --------------------------------------------------------------------------------------
class FakeNvml:
    NVML_TEMPERATURE_GPU = 0

    def __init__(self, fail_reads: bool = False) -> None:
        self.fail_reads = fail_reads

    def nvmlInit(self) -> None: ...

    def nvmlDeviceGetCount(self) -> int:
        return 2

    def nvmlDeviceGetHandleByIndex(self, i: int) -> str:
        return f"h{i}"

    def nvmlDeviceGetHandleByPciBusId(self, bus: str) -> str:
        return {"0000:41:00.0": "h1"}[bus]

    def nvmlDeviceGetIndex(self, h: str) -> int:
        return int(h[1:])

    def nvmlDeviceGetMemoryInfo(self, h: str) -> SimpleNamespace:
        if self.fail_reads:
            raise RuntimeError("NVML_ERROR_GPU_IS_LOST")
        return SimpleNamespace(used=3 << 30, total=80 << 30)

    def nvmlDeviceGetUtilizationRates(self, h: str) -> SimpleNamespace:
        return SimpleNamespace(gpu=42)

    def nvmlDeviceGetTemperature(self, h: str, sensor: int) -> int:
        return 61


def _sample(gauge, label: str) -> float:
    return gauge.labels(label)._value.get()


def test_monitor_exports_the_device_this_process_uses() -> None:
    monitor = GpuMonitor(nvml=FakeNvml(), pci_bus_ids=["0000:41:00.0"])
    monitor.refresh()
    assert monitor.available
    assert _sample(gpu.MEMORY_USED, "1") == 3 << 30 and _sample(gpu.MEMORY_TOTAL, "1") == 80 << 30
    assert _sample(gpu.UTILIZATION, "1") == pytest.approx(0.42)
    assert _sample(gpu.TEMPERATURE, "1") == 61


def test_an_nvml_read_error_never_raises() -> None:
    monitor = GpuMonitor(nvml=FakeNvml(fail_reads=True), pci_bus_ids=None)
    monitor.refresh()
    monitor.refresh()


def test_telemetry_is_off_without_nvml() -> None:
    class Missing:
        def nvmlInit(self) -> None:
            raise RuntimeError("NVML Shared Library Not Found")

    monitor = GpuMonitor(nvml=Missing())
    monitor.refresh()
    assert not monitor.available


# -- on a GPU -----------------------------------------------------------------------------------------
def _recall(rows: np.ndarray, gt: np.ndarray) -> float:
    return float(np.mean([len(set(r[r >= 0]) & set(g[g >= 0])) / max(1, (g >= 0).sum())
                          for r, g in zip(rows, gt, strict=True)]))


@pytest.fixture(scope="module")
def gpu_data():
    from gmco_common.datagen import generate_catalogue, generate_queries

    cat = generate_catalogue(20_000, dim=128, n_clusters=20, seed=3)
    return cat, generate_queries(cat, 64, seed=4)


def _cagra(dim: int = 128):
    from gmco_shard.index.base import IndexParams, backend_class

    return backend_class("cuvs")(dim, IndexParams())


@pytest.mark.gpu
def test_cagra_recall_and_scores(gpu_data) -> None:
    from gmco_common.datagen import exact_ground_truth

    cat, q = gpu_data
    index = _cagra()
    index.build(np.asarray(cat.vectors))
    scores, rows = index.search(q, 10)
    assert _recall(rows, exact_ground_truth(cat.vectors, q, 10)) >= 0.95
    want = np.einsum("qd,qkd->qk", q, np.asarray(cat.vectors, np.float32)[rows])
    np.testing.assert_allclose(scores, want, atol=2e-2)  # FP16 storage
    assert (np.diff(scores, axis=1) <= 1e-6).all()


@pytest.mark.gpu
def test_bitset_prefilter_and_brute_force_over_allowed_rows(gpu_data) -> None:
    from gmco_common.datagen import exact_ground_truth

    cat, q = gpu_data
    index = _cagra()
    index.build(np.asarray(cat.vectors))
    from gmco_shard import bitmaps

    mask = np.zeros(len(cat), bool)
    mask[::7] = True
    allow = bitmaps.from_bools(mask)  # the store's row bitmap
    gt = exact_ground_truth(cat.vectors, q, 10, mask)
    _, rows = index.search(q, 10, allow)
    assert mask[rows[rows >= 0]].all() and _recall(rows, gt) >= 0.9
    _, exact_rows = index.exact_search(q, 10, allow)
    assert _recall(exact_rows, gt) >= 0.99
    few = bitmaps.from_rows(np.array([5, 17, 900]), len(cat))  # fewer allowed rows than k: the rest is padding
    _, rows = index.exact_search(q[:2], 10, few)
    assert sorted(rows[0][rows[0] >= 0].tolist()) == [5, 17, 900] and (rows[:, 3:] == -1).all()


@pytest.mark.gpu
def test_a_segment_too_small_for_a_graph_is_searched_by_brute_force(gpu_data) -> None:
    cat, q = gpu_data
    index = _cagra()
    index.build(np.asarray(cat.vectors[:50]))
    _, rows = index.search(q[:3], 5)
    assert ((rows >= 0) & (rows < 50)).all()


@pytest.mark.gpu
def test_snapshot_restores_the_graph_without_rebuilding(tmp_path, monkeypatch, small_catalogue) -> None:
    from cuvs.neighbors import cagra
    from gmco_shard.columns import columns_from_catalogue
    from gmco_shard.index.base import IndexParams
    from gmco_shard.snapshot import load_snapshot, save_snapshot
    from gmco_shard.store import ShardStore

    vectors = np.asarray(small_catalogue.vectors)
    store = ShardStore(vectors.shape[1], "cuvs", IndexParams())
    store.bulk_load(vectors, columns_from_catalogue(small_catalogue))
    save_snapshot(store, tmp_path)
    monkeypatch.setattr(cagra, "build", lambda *a, **k: pytest.fail("a restart rebuilt the CAGRA graph"))
    again = ShardStore(vectors.shape[1], "cuvs", IndexParams())
    load_snapshot(again, tmp_path)
    q = vectors[:8].astype(np.float32)
    assert np.array_equal(again.search(q, 10).media_ids, store.search(q, 10).media_ids)


@pytest.mark.gpu
def test_a_load_beyond_the_pool_is_refused(monkeypatch, gpu_data) -> None:
    from gmco_common.errors import ResourceExhausted
    from gmco_shard.index import cuvs as cuvs_index

    cat, _ = gpu_data
    index = _cagra()
    monkeypatch.setattr(cuvs_index._POOL, "size", cuvs_index._POOL.resident + 1024)
    with pytest.raises(ResourceExhausted, match="GPU memory"):
        index.build(np.asarray(cat.vectors))


@pytest.mark.gpu
def test_probe_and_telemetry_on_a_real_device() -> None:
    assert gpu.cuda_probe() is True
    monitor = GpuMonitor()
    monitor.refresh()
    assert monitor.available


@pytest.mark.gpu
async def test_micro_batched_grpc_searches_on_the_gpu(small_catalogue, catalogue_dir) -> None:
    from gmco.shard.v1 import shard_service_pb2 as pb
    from gmco.shard.v1 import shard_service_pb2_grpc
    from gmco_common.vectors import encode_batch
    from shard_testkit import serve_shard, shard_settings

    vectors = np.asarray(small_catalogue.vectors)
    settings = shard_settings(catalogue_dir, index_backend="cuvs", batch_window_ms=1.0, batch_max=256)
    async with serve_shard(settings) as svc:
        stub = svc.stub(shard_service_pb2_grpc.ShardServiceStub)
        q = vectors[:32].astype(np.float32)
        alone = await stub.Search(pb.SearchRequest(queries=encode_batch(q), k=5))
        singles = await asyncio.gather(*(stub.Search(pb.SearchRequest(queries=encode_batch(q[i:i + 1]), k=5))
                                         for i in range(32)))
        servicer = svc.parts["servicer"]
    assert servicer._batcher is not None and servicer._batcher.batches_run < 33
    # CAGRA is not batch-invariant (a merged batch may walk the graph differently): compare overlap.
    overlaps = [len({it.media_id for it in resp.results[0].items} & {it.media_id for it in alone.results[i].items})
                for i, resp in enumerate(singles)]
    assert np.mean(overlaps) >= 4.5, overlaps
