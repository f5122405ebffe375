"""GPU telemetry through NVML (nvidia-ml-py) and the CUDA health probe of a GPU shard (cuvs, cupy).

The shard's entry point builds these only for a GPU backend (``cuvs``, ``cupy``); on a CPU install NVML is
absent and the gauges below export no samples. The monitor reports the device this process computes
on (matched to NVML by PCI bus id through CuPy), or every NVML device when CuPy is missing.

The health gate runs a tiny device operation each second. Two failed or timed-out probes in a row make
the shard NOT_SERVING, so balancers and the router send it nothing; one success makes it SERVING again.
A probe that hangs (a wedged device) counts as failed after ``timeout`` seconds and is never stacked:
while it is stuck, each check fails at once.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from types import ModuleType
from typing import Any

from prometheus_client import Gauge

log = logging.getLogger(__name__)

MEMORY_USED = Gauge("gmco_shard_gpu_memory_used_bytes", "GPU device memory in use.", ["gpu"])
MEMORY_TOTAL = Gauge("gmco_shard_gpu_memory_total_bytes", "GPU device memory in total.", ["gpu"])
UTILIZATION = Gauge("gmco_shard_gpu_utilization_ratio", "GPU compute utilisation, 0..1.", ["gpu"])
TEMPERATURE = Gauge("gmco_shard_gpu_temperature_celsius", "GPU temperature.", ["gpu"])


def _current_pci_bus_ids() -> list[str] | None:
    """PCI bus id of the CUDA device this process uses, or None when CuPy/CUDA cannot tell."""
    try:
        import cupy

        return [cupy.cuda.Device().pci_bus_id]
    except Exception:  # noqa: BLE001 - no CuPy or no usable device: fall back to every NVML device
        return None


class GpuMonitor:
    """Reads NVML on each ``refresh()``; a no-op where NVML is missing. ``nvml`` is injectable for tests."""

    def __init__(self, nvml: ModuleType | Any | None = None, pci_bus_ids: list[str] | None = None) -> None:
        self._nvml: Any = None
        self._handles: list[tuple[str, Any]] = []
        self._failing = False
        try:
            if nvml is None:
                import pynvml as nvml
            nvml.nvmlInit()
            bus_ids = pci_bus_ids if pci_bus_ids is not None else _current_pci_bus_ids()
            if bus_ids is None:
                handles = [nvml.nvmlDeviceGetHandleByIndex(i) for i in range(nvml.nvmlDeviceGetCount())]
            else:
                handles = [nvml.nvmlDeviceGetHandleByPciBusId(bus) for bus in bus_ids]
            self._handles = [(str(nvml.nvmlDeviceGetIndex(h)), h) for h in handles]
            self._nvml = nvml
        except Exception as exc:  # noqa: BLE001 - ImportError or an NVML error: no GPU telemetry
            log.info("GPU telemetry off: %s", exc)
            self._handles = []

    @property
    def available(self) -> bool:
        return bool(self._handles)

    def refresh(self) -> None:
        """Update the gauges; an NVML error is logged (once per failing spell) and never raised."""
        nvml = self._nvml
        try:
            for label, h in self._handles:
                mem = nvml.nvmlDeviceGetMemoryInfo(h)
                MEMORY_USED.labels(label).set(mem.used)
                MEMORY_TOTAL.labels(label).set(mem.total)
                UTILIZATION.labels(label).set(nvml.nvmlDeviceGetUtilizationRates(h).gpu / 100.0)
                TEMPERATURE.labels(label).set(nvml.nvmlDeviceGetTemperature(h, nvml.NVML_TEMPERATURE_GPU))
        except Exception as exc:  # noqa: BLE001 - telemetry must not take the service down
            if not self._failing:
                log.warning("NVML read failed: %s", exc)
            self._failing = True
        else:
            self._failing = False


class CudaProbe:
    """A device round trip on a stream of its own: write a fresh value into a small device buffer and read it
    back, waiting for that stream only. It never synchronises the device, so a GPU busy with long searches
    on other streams is not reported unhealthy, and it allocates nothing after the first call (so a full
    memory pool does not read as a broken context). ``cupy`` is injectable for tests."""

    def __init__(self, cupy: Any = None) -> None:
        self._cupy = cupy
        self._buf: Any = None
        self._stream: Any = None
        self._round = 0

    def __call__(self) -> bool:
        try:
            cp = self._cupy
            if cp is None:
                import cupy as cp
            if self._buf is None:
                self._stream = cp.cuda.Stream(non_blocking=True)
                with self._stream:
                    self._buf = cp.zeros(8, dtype=cp.int32)
            self._round = self._round % 1000 + 1
            with self._stream:
                self._buf.fill(self._round)
                host = self._buf.get(stream=self._stream)  # waits for this stream, not the device
            return bool((host == self._round).all())
        except Exception as exc:  # noqa: BLE001 - any failure means the context is unusable
            log.warning("CUDA probe failed: %s", exc)
            return False


cuda_probe = CudaProbe()


class HealthGate:
    """Turns probe results into serving / not serving: ``failures`` consecutive failed probes make it
    unhealthy, one success healthy again. A probe running past ``timeout`` seconds is a failure."""

    def __init__(self, probe: Callable[[], bool], failures: int = 2, timeout: float = 5.0) -> None:
        if failures < 1 or timeout <= 0:
            raise ValueError("failures must be >= 1 and timeout > 0")
        self._probe = probe
        self._needed = failures
        self._timeout = timeout
        self._failed = 0
        self._stuck: threading.Thread | None = None
        self.healthy = True

    def _probe_ok(self) -> bool:
        if self._stuck is not None:
            if self._stuck.is_alive():
                return False
            self._stuck = None
        result: list[bool] = []

        def run() -> None:
            try:
                result.append(bool(self._probe()))
            except Exception:  # noqa: BLE001 - a raising probe is a failed probe
                result.append(False)

        thread = threading.Thread(target=run, name="cuda-probe", daemon=True)
        thread.start()
        thread.join(self._timeout)
        if thread.is_alive():
            self._stuck = thread
            return False
        return result[0]

    def check(self) -> bool:
        """Probe once (blocking for at most ``timeout`` seconds) and return whether the shard is healthy."""
        if self._probe_ok():
            self._failed = 0
            self.healthy = True
        else:
            self._failed += 1
            if self._failed >= self._needed:
                self.healthy = False
        return self.healthy
