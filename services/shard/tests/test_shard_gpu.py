"""GPU-side pieces that run everywhere (health gate, telemetry off without NVML, the missing extra),
and `gpu` tests of the cuVS backend that run only where a GPU with cuVS is present."""

from __future__ import annotations

import numpy as np
import pytest

from gmco_common.config import ConfigError
from gmco_shard.gpu import GpuMonitor, HealthGate
from gmco_shard.index.base import IndexParams, backend_class


def test_health_gate_needs_consecutive_failures_and_recovers() -> None:
    answers = iter([True, False, True, False, False, True])
    gate = HealthGate(lambda: next(answers), failures=2)
    assert [gate.check() for _ in range(6)] == [True, True, True, True, False, True]


def test_telemetry_is_off_without_nvml() -> None:
    monitor = GpuMonitor()
    monitor.refresh()  # never raises, GPU or not
    try:
        import pynvml  # noqa: F401
    except ImportError:
        assert not monitor.available


def test_choosing_cuvs_without_the_extra_says_what_to_install() -> None:
    try:
        import cuvs  # noqa: F401
    except ImportError:
        with pytest.raises(ConfigError, match="--extra gpu"):
            backend_class("cuvs")
    else:
        assert backend_class("cuvs").name == "cuvs"


@pytest.mark.gpu
def test_cagra_recall_filter_and_snapshot(tmp_path) -> None:
    from gmco_common.datagen import exact_ground_truth, generate_catalogue, generate_queries

    cat = generate_catalogue(20_000, dim=128, n_clusters=20, seed=3)
    index = backend_class("cuvs")(128, IndexParams())
    index.build(np.asarray(cat.vectors))
    q = generate_queries(cat, 50)
    gt = exact_ground_truth(cat.vectors, q, 10)
    _, rows = index.search(q, 10)
    assert np.mean([len(set(r) & set(g)) / 10 for r, g in zip(rows, gt, strict=True)]) >= 0.9
    allow = np.zeros(len(cat), bool)
    allow[::7] = True
    _, rows = index.search(q, 10, allow)
    assert allow[rows[rows >= 0]].all()
    index.save(tmp_path)
    again = backend_class("cuvs")(128, IndexParams())
    again.load(tmp_path, np.asarray(cat.vectors))
    assert np.array_equal(again.search(q, 10)[1], index.search(q, 10)[1])
