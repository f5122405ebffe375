"""GPU telemetry through NVML (nvidia-ml-py) and a CUDA health probe for the shard.

Exported only when NVML is present: device memory used/total, utilisation and temperature. The
probe runs a tiny device operation; when it fails the shard's health goes NOT_SERVING so that load
balancers and the router stop sending it work.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from prometheus_client import Gauge

log = logging.getLogger(__name__)

MEMORY_USED = Gauge("gmco_shard_gpu_memory_used_bytes", "GPU device memory in use.", ["gpu"])
MEMORY_TOTAL = Gauge("gmco_shard_gpu_memory_total_bytes", "GPU device memory in total.", ["gpu"])
UTILIZATION = Gauge("gmco_shard_gpu_utilization_ratio", "GPU compute utilisation, 0..1.", ["gpu"])
TEMPERATURE = Gauge("gmco_shard_gpu_temperature_celsius", "GPU temperature.", ["gpu"])


class GpuMonitor:
    """Reads NVML each ``refresh()``; does nothing where NVML is missing (CPU installs)."""

    def __init__(self) -> None:
        try:
            import pynvml

            pynvml.nvmlInit()
            self._nvml = pynvml
            self._handles = [pynvml.nvmlDeviceGetHandleByIndex(i) for i in range(pynvml.nvmlDeviceGetCount())]
        except Exception as exc:  # noqa: BLE001 - ImportError or NVMLError: no GPU telemetry
            log.info("GPU telemetry off: %s", exc)
            self._nvml = None
            self._handles = []

    @property
    def available(self) -> bool:
        return bool(self._handles)

    def refresh(self) -> None:
        for i, h in enumerate(self._handles):
            mem = self._nvml.nvmlDeviceGetMemoryInfo(h)
            util = self._nvml.nvmlDeviceGetUtilizationRates(h)
            MEMORY_USED.labels(str(i)).set(mem.used)
            MEMORY_TOTAL.labels(str(i)).set(mem.total)
            UTILIZATION.labels(str(i)).set(util.gpu / 100.0)
            TEMPERATURE.labels(str(i)).set(self._nvml.nvmlDeviceGetTemperature(h, self._nvml.NVML_TEMPERATURE_GPU))


def cuda_probe() -> bool:
    """True when a small CUDA operation succeeds on the current device."""
    try:
        import cupy

        return int(cupy.arange(4).sum().get()) == 6
    except Exception:  # noqa: BLE001 - any failure means the context is unusable
        return False


class HealthGate:
    """Turns probe results into serving / not serving, with hysteresis: ``failures`` consecutive failed
    probes make it unhealthy, one success makes it healthy again."""

    def __init__(self, probe: Callable[[], bool], failures: int = 2) -> None:
        self._probe = probe
        self._needed = failures
        self._failed = 0
        self.healthy = True

    def check(self) -> bool:
        if self._probe():
            self._failed = 0
            self.healthy = True
        else:
            self._failed += 1
            if self._failed >= self._needed:
                self.healthy = False
        return self.healthy
