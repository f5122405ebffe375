"""The cuVS backend's CPU-side decisions, tested everywhere: parameters and their validation, settings
wiring, pool sizing, the refusal to load what cannot fit, bitset packing, out-of-memory recognition, the
store preferring the index's own exact search, and the error when the gpu extra is missing."""

from __future__ import annotations

import os
import subprocess
import sys
from typing import ClassVar

import numpy as np
import pytest
from gmco.common.v1 import common_pb2
from gmco_common.config import ConfigError, load_settings
from gmco_common.errors import ResourceExhausted
from gmco_shard import bitmaps
from gmco_shard import store as store_module
from gmco_shard.config import PREFIX, Settings
from gmco_shard.index.base import backend_class
from gmco_shard.index.cuvs_support import bitset, check_fits, is_out_of_memory
from gmco_shard.index.exact import ExactIndex
from gmco_shard.index.params import POOL_HEADROOM_BYTES, CagraParams
from gmco_shard.planner import Planner, PlannerCosts

GIB = 1 << 30


def test_documented_defaults() -> None:
    p = CagraParams()
    assert (p.graph_degree, p.intermediate_graph_degree, p.itopk_size, p.search_width, p.num_random_samplings) == (
        64, 128, 128, 4, 8)
    assert p.build_algo == "ivf_pq" and p.pool_bytes == 0


@pytest.mark.parametrize(("kwargs", "names"), [
    ({"graph_degree": 0}, "CAGRA_GRAPH_DEGREE"),
    ({"graph_degree": 96, "intermediate_graph_degree": 64}, "CAGRA_INTERMEDIATE_GRAPH_DEGREE"),
    ({"itopk_size": 0}, "CAGRA_ITOPK_SIZE"),
    ({"search_width": 0}, "CAGRA_SEARCH_WIDTH"),
    ({"num_random_samplings": 0}, "CAGRA_NUM_RANDOM_SAMPLINGS"),
    ({"build_algo": "brute"}, "CAGRA_BUILD_ALGO"),
    ({"pool_bytes": -1}, "GPU_POOL_BYTES"),
    ({"pool_fraction": 0.0}, "GPU_POOL_FRACTION"),
    ({"pool_fraction": 1.5}, "GPU_POOL_FRACTION"),
])
def test_bad_parameters_name_the_variable(kwargs, names) -> None:
    with pytest.raises(ConfigError, match=f"GMCO_SHARD_{names}"):
        CagraParams(**kwargs)


def test_settings_reach_the_index_typed(monkeypatch) -> None:
    for var, value in {"CAGRA_GRAPH_DEGREE": "32", "CAGRA_INTERMEDIATE_GRAPH_DEGREE": "48",
                       "CAGRA_ITOPK_SIZE": "256", "CAGRA_SEARCH_WIDTH": "8", "CAGRA_NUM_RANDOM_SAMPLINGS": "2",
                       "CAGRA_BUILD_ALGO": "nn_descent", "GPU_POOL_BYTES": str(8 * GIB)}.items():
        monkeypatch.setenv(PREFIX + var, value)
    settings = load_settings(Settings, PREFIX)
    p = settings.index_params().cagra
    assert p == CagraParams(graph_degree=32, intermediate_graph_degree=48, build_algo="nn_descent", itopk_size=256,
                            search_width=8, num_random_samplings=2, pool_bytes=8 * GIB)


def test_inconsistent_settings_fail_at_start(monkeypatch) -> None:
    monkeypatch.setenv(PREFIX + "CAGRA_GRAPH_DEGREE", "128")
    monkeypatch.setenv(PREFIX + "CAGRA_INTERMEDIATE_GRAPH_DEGREE", "64")
    with pytest.raises(ConfigError, match="INTERMEDIATE_GRAPH_DEGREE=64 must be >="):
        load_settings(Settings, PREFIX)


def test_unparsable_setting_names_the_variable(monkeypatch) -> None:
    monkeypatch.setenv(PREFIX + "CAGRA_ITOPK_SIZE", "many")
    with pytest.raises(ConfigError, match="GMCO_SHARD_CAGRA_ITOPK_SIZE='many'"):
        load_settings(Settings, PREFIX)


@pytest.mark.parametrize(("k", "ef", "expected"), [(10, 0, 128), (10, 40, 64), (10, 256, 256), (200, 0, 224),
                                                   (1000, 0, 1024), (1, 1, 32)])
def test_itopk_is_the_request_ef_or_the_default_at_least_k_and_32_aligned(k, ef, expected) -> None:
    assert CagraParams().itopk_for(k, ef) == expected


def test_pool_size_from_bytes_or_fraction() -> None:
    assert CagraParams(pool_bytes=4 * GIB + 100).pool_size(80 * GIB) == 4 * GIB  # aligned down to 256
    by_fraction = CagraParams(pool_fraction=0.5).pool_size(80 * GIB)
    assert by_fraction == (80 * GIB - POOL_HEADROOM_BYTES) // 2 // 256 * 256
    with pytest.raises(ConfigError, match="exceeds"):
        CagraParams(pool_bytes=100 * GIB).pool_size(80 * GIB)


def test_a_load_that_cannot_fit_is_refused_before_touching_the_device() -> None:
    p = CagraParams()
    resident = p.device_bytes(1_000_000, 1024, building=False)
    assert resident == 1_000_000 * (1024 * 2 + 64 * 4)  # FP16 rows + uint32 graph
    building = p.device_bytes(1_000_000, 1024, building=True)
    assert building > resident
    check_fits(building, 80 * GIB, 1_000_000)
    with pytest.raises(ResourceExhausted, match="GPU_POOL_BYTES"):
        check_fits(building, 2 * GIB, 1_000_000)


@pytest.mark.parametrize("n", [1, 31, 32, 33, 1000])
def test_bitset_bit_i_of_the_uint32_words_is_row_i(n) -> None:
    rng = np.random.default_rng(n)
    allow = rng.random(n) < 0.3
    words = bitset(bitmaps.from_bools(allow), n)
    assert words.dtype == np.uint32 and len(words) == -(-n // 32)
    decoded = [(int(words[i // 32]) >> (i % 32)) & 1 for i in range(n)]
    assert decoded == allow.astype(int).tolist()
    assert all((int(words[i // 32]) >> (i % 32)) & 1 == 0 for i in range(n, len(words) * 32))  # padding: denied


@pytest.mark.parametrize(("exc", "oom"), [
    (MemoryError("std::bad_alloc: out_of_memory: CUDA error"), True),
    (RuntimeError("rmm::out_of_memory: Maximum pool size exceeded"), True),
    (Exception("cudaErrorMemoryAllocation out of memory"), True),
    (RuntimeError("cudaErrorIllegalAddress: an illegal memory access was encountered"), False),
    (ValueError("Index needs to be built before calling search."), False),
])
def test_out_of_memory_is_recognised_from_each_library(exc, oom) -> None:
    assert is_out_of_memory(exc) is oom


class _RecordingExact(ExactIndex):
    """An ANN index that offers its own exact search, as the cuvs backend does (GPU brute force)."""

    exact = False
    calls: ClassVar[list[str]] = []

    def search(self, queries, k, allow=None, ef=0):
        self.calls.append("index")
        return super().search(queries, k, allow, ef)

    def exact_search(self, queries, k, allow=None):
        self.calls.append("exact_search")
        return super().search(queries, k, allow)


def test_the_store_prefers_the_index_exact_search_for_selective_filters(monkeypatch, make_store,
                                                                        small_catalogue) -> None:
    monkeypatch.setattr(store_module, "create_index", lambda name, dim, params: _RecordingExact(dim, params))
    _RecordingExact.calls = []
    store = make_store("exact", planner=Planner(PlannerCosts(exact_max_rows=300)))
    q = np.asarray(small_catalogue.vectors[:2], np.float32)
    assert not store.search(q, 5).exact
    rare = int(np.bincount(small_catalogue.genre_ids[:, 0]).argmin())  # a genre few rows carry
    res = store.search(q, 5, common_pb2.Filter(allowed_genre_ids=[rare]))
    assert res.exact and res.allowed <= 300
    assert _RecordingExact.calls == ["index", "exact_search"]


def test_choosing_cuvs_without_the_extra_says_what_to_install(monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "cupy", None)  # what a CPU install looks like, even on a GPU machine
    monkeypatch.delitem(sys.modules, "gmco_shard.index.cuvs", raising=False)
    with pytest.raises(ConfigError, match=r"index backend 'cuvs' is not installed .*--extra gpu"):
        backend_class("cuvs")


def test_the_service_refuses_to_start_with_cuvs_and_no_extra() -> None:
    # A real `python -m gmco_shard` start, with CuPy made unimportable as on a CPU install.
    code = "import sys; sys.modules['cupy'] = None; from gmco_shard.__main__ import main; sys.exit(main())"
    env = {**os.environ, "GMCO_SHARD_INDEX_BACKEND": "cuvs", "GMCO_SHARD_PORT": "0"}
    proc = subprocess.run([sys.executable, "-c", code], check=False, env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1, proc.stderr
    assert "index backend 'cuvs' is not installed" in proc.stderr
    assert "uv sync --package gmco-shard --extra gpu" in proc.stderr
