"""CPU stand-in of NVML (nvidia-ml-py): one device, named after the stand-in."""

from __future__ import annotations

import types

NVML_TEMPERATURE_GPU = 0
STANDIN = True


def nvmlInit() -> None:
    pass


def nvmlShutdown() -> None:
    pass


def nvmlDeviceGetCount() -> int:
    return 1


def nvmlDeviceGetHandleByIndex(i: int) -> str:
    return f"h{i}"


def nvmlDeviceGetHandleByPciBusId(bus: str) -> str:
    return "h0"


def nvmlDeviceGetIndex(h: str) -> int:
    return int(h[1:])


def nvmlDeviceGetName(h: str) -> str:
    return "CPU stand-in (numpy)"


def nvmlSystemGetDriverVersion() -> str:
    return "0.0 (stand-in)"


def nvmlDeviceGetMemoryInfo(h: str) -> types.SimpleNamespace:
    return types.SimpleNamespace(used=1 << 30, total=80 << 30, free=79 << 30)


def nvmlDeviceGetUtilizationRates(h: str) -> types.SimpleNamespace:
    return types.SimpleNamespace(gpu=0, memory=0)


def nvmlDeviceGetTemperature(h: str, sensor: int) -> int:
    return 30
