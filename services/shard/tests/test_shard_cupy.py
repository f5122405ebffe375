"""The GPU backends' device code, run twice: on the CPU stand-ins of CuPy/cuVS/rmm (scripts/gpu-standins,
everywhere, in CI) and, under the ``gpu`` marker, on the real libraries of an NVIDIA GPU. The same assertions
hold for both; the stand-ins also reproduce what would break on first contact (cuVS 26.10's stream cast, a
pool larger than the free memory, host arrays where device arrays belong).

Plus the CPU-side checks of the GPU session's preparation: load errors explained, the shard importable
without psycopg or faiss."""

from __future__ import annotations

import contextlib
import importlib
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import gmco_kernels
import numpy as np
import pytest
from gmco.common.v1 import common_pb2
from gmco_common.config import ConfigError
from gmco_common.errors import ResourceExhausted
from gmco_shard import bitmaps
from gmco_shard.columns import columns_from_catalogue
from gmco_shard.index.params import CagraParams, IndexParams
from gmco_shard.store import ShardStore

STANDINS = Path(__file__).resolve().parents[3] / "scripts" / "gpu-standins"
_LIBRARIES = ("cupy", "cuvs", "rmm", "pylibraft", "libcuvs", "pynvml")
_OURS = ("gmco_shard.index.cupy", "gmco_shard.index.cuvs")


def _ours(name: str) -> bool:
    return name.split(".")[0] in _LIBRARIES or name in _OURS


@contextlib.contextmanager
def gpu_libraries(kind: str):
    """The GPU libraries this test sees: the stand-ins (put first on sys.path for the test only, every
    module of theirs and of ours that imported them dropped afterwards), or whatever is installed."""
    saved = {n: m for n, m in sys.modules.items() if _ours(n)}
    if kind == "standin":
        for name in saved:
            del sys.modules[name]
        sys.path.insert(0, str(STANDINS))
    try:
        yield importlib.import_module("cupy")
    finally:
        if kind == "standin":
            sys.path.remove(str(STANDINS))
            for name in [n for n in sys.modules if _ours(n)]:
                del sys.modules[name]
            sys.modules.update(saved)


@pytest.fixture(params=["standin", pytest.param("device", marks=pytest.mark.gpu)])
def gpu(request):
    with gpu_libraries(request.param) as cp:
        yield SimpleNamespace(kind=request.param, cp=cp)


@pytest.fixture
def standin():
    with gpu_libraries("standin") as cp:
        cp.standin.events.clear()
        yield cp


def _rows(n: int, d: int, seed: int = 0) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal((n, d), dtype=np.float32)
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float16)


def _queries(x: np.ndarray, q: int, seed: int = 1) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return x[rng.integers(0, x.shape[0], q)].astype(np.float32) + 0.2 * rng.standard_normal((q, x.shape[1]),
                                                                                           dtype=np.float32)


def _agree(rows: np.ndarray, want: np.ndarray) -> float:
    return float(np.mean([len(set(r[r >= 0].tolist()) & set(w[w >= 0].tolist())) / max(1, int((w >= 0).sum()))
                          for r, w in zip(rows, want, strict=True)]))


def _cupy_index(dim: int, metric: str = "ip"):
    from gmco_shard.index.base import backend_class

    return backend_class("cupy")(dim, IndexParams(metric=metric))


# -- the cupy backend -----------------------------------------------------------------------------------
def test_top_indices_are_the_k_largest(gpu) -> None:
    from gmco_shard.index.cupy import top_indices

    rng = np.random.default_rng(3)
    s = rng.integers(0, 500, (6, 20_000)).astype(np.float16)  # many ties
    s[2, :] = -np.inf
    s[2, [7, 70, 700]] = 1.0
    for k in (1, 10, 36, 300):
        got = gpu.cp.asnumpy(top_indices(gpu.cp.asarray(s), k))
        assert got.shape == (6, k)
        for i in range(6):
            want = np.sort(s[i])[::-1][:k]
            assert np.array_equal(np.sort(s[i, got[i]])[::-1], want)
    assert sorted(gpu.cp.asnumpy(top_indices(gpu.cp.asarray(s), 3))[2].tolist()) == [7, 70, 700]


@pytest.mark.parametrize("metric", ["ip", "l2"])
def test_exact_search_matches_the_cpu_kernel(gpu, metric) -> None:
    x = _rows(20_000, 32)
    q = _queries(x, 40)
    index = _cupy_index(32, metric)
    index.build(x)
    assert index.vectors is None and index.on_gpu  # the segment keeps the host rows; one copy on the device
    scores, rows = index.search(q, 10)
    want_s, want_r = gmco_kernels.scan(q, x, 10, metric)
    assert _agree(rows, want_r) >= 0.99
    np.testing.assert_allclose(scores, want_s, rtol=1e-4, atol=1e-4)  # rescored in FP32: the kernel's scores
    assert (np.diff(scores, axis=1) <= 1e-6).all()


@pytest.mark.parametrize("share", [0.6, 0.05, "three"])
def test_the_allow_bitmap_is_applied_on_the_device(gpu, share) -> None:
    x = _rows(20_000, 32)
    q = _queries(x, 20)
    rng = np.random.default_rng(4)
    if share == "three":
        mask = np.zeros(x.shape[0], bool)
        mask[[5, 17, 19_999]] = True
    else:
        mask = rng.random(x.shape[0]) < share
    allow = bitmaps.from_bools(mask)
    index = _cupy_index(32)
    index.build(x)
    scores, rows = index.search(q, 10, allow)
    assert mask[rows[rows >= 0]].all()
    _, want = gmco_kernels.scan(q, x, 10, "ip", allow=allow)
    assert _agree(rows, want) >= 0.99
    if share == "three":
        assert (rows[:, 3:] == -1).all() and np.isneginf(scores[:, 3:]).all()
        assert all(sorted(r[:3].tolist()) == [5, 17, 19_999] for r in rows)


def test_k_above_the_row_count_is_padded(gpu) -> None:
    x = _rows(7, 32)
    index = _cupy_index(32)
    index.build(x)
    scores, rows = index.search(_queries(x, 2), 10)
    assert (np.sort(rows[:, :7], axis=1) == np.arange(7)).all()
    assert (rows[:, 7:] == -1).all() and np.isneginf(scores[:, 7:]).all()


def test_chunks_over_rows_and_queries_give_the_same_answer(gpu) -> None:
    from gmco_shard.index.cupy import DeviceRows, chunk_shape

    assert chunk_shape(4096, 1_000_000, 2.2) == (244, 1_000_000)  # the 1M x 1024 shard: all rows per chunk
    assert chunk_shape(1, 1_000_000, 2.2) == (1, 1_000_000)
    x = _rows(20_000, 32)
    q = _queries(x, 70)
    whole = DeviceRows(x, "ip").search(q, 10)
    small = DeviceRows(x, "ip", budget=64 << 10)
    assert chunk_shape(70, small.padded, 2.2, 64 << 10)[1] < small.padded  # several row chunks
    chunked = small.search(q, 10)
    assert np.array_equal(whole[1], chunked[1])
    np.testing.assert_allclose(whole[0], chunked[0], rtol=1e-6)


def test_a_shard_on_the_cupy_backend_answers_as_the_exact_one(gpu, small_catalogue) -> None:
    vectors = np.asarray(small_catalogue.vectors)
    cols = columns_from_catalogue(small_catalogue)
    stores = {}
    for backend in ("cupy", "exact"):
        stores[backend] = ShardStore(vectors.shape[1], backend, IndexParams())
        stores[backend].bulk_load(vectors, cols)
    q = vectors[:16].astype(np.float32)
    common = int(np.bincount(small_catalogue.genre_ids[:, 0]).argmax())
    for flt in (None, common_pb2.Filter(allowed_genre_ids=[common]), common_pb2.Filter(max_rating=2)):
        a, b = stores["cupy"].search(q, 10, flt), stores["exact"].search(q, 10, flt)
        assert _agree(a.media_ids.astype(np.int64), b.media_ids.astype(np.int64)) >= 0.99
        np.testing.assert_allclose(a.scores, b.scores, rtol=1e-4, atol=1e-4)


def test_host_rows_scanned_on_the_device(gpu) -> None:
    from gmco_shard.index.cupy import scan_host_rows

    x = _rows(3000, 32)  # a growing segment's rows, uploaded for the call
    q = _queries(x, 5)
    mask = np.random.default_rng(6).random(x.shape[0]) < 0.5
    _, rows = scan_host_rows(x, q, 10, "ip", bitmaps.from_bools(mask))
    _, want = gmco_kernels.scan(q, x, 10, "ip", allow=bitmaps.from_bools(mask))
    assert _agree(rows, want) >= 0.99 and mask[rows[rows >= 0]].all()


def test_oom_is_resource_exhausted_and_a_load_that_cannot_fit_is_refused(standin, monkeypatch) -> None:
    x = _rows(5000, 32)
    monkeypatch.setenv("GMCO_STANDIN_ALLOC_LIMIT", "4096")
    with pytest.raises(ResourceExhausted, match="GPU memory exhausted"):
        _cupy_index(32).build(x)
    monkeypatch.delenv("GMCO_STANDIN_ALLOC_LIMIT")
    monkeypatch.setenv("GMCO_STANDIN_GPU_BYTES", str(1 << 30))  # less than the search headroom alone
    with pytest.raises(ResourceExhausted, match="5000 rows need"):
        _cupy_index(32).build(x)


def test_the_standin_refuses_host_device_mixups(standin) -> None:
    with pytest.raises(TypeError, match="Implicit conversion"):
        np.asarray(standin.zeros(3))
    with pytest.raises(TypeError, match="host numpy array"):
        standin.argsort(np.zeros(3))


# -- the cuvs backend ---------------------------------------------------------------------------------
def _cagra(dim: int):
    from gmco_shard.index.base import backend_class

    return backend_class("cuvs")(dim, IndexParams())


def test_cagra_results_are_rescored_and_filtered_on_the_device(gpu) -> None:
    x = _rows(20_000, 32)
    q = _queries(x, 30)
    index = _cagra(32)
    index.build(x)
    scores, rows = index.search(q, 10)
    _, want = gmco_kernels.scan(q, x, 10, "ip")
    assert _agree(rows, want) >= 0.9
    exact = np.einsum("qd,qkd->qk", q, x.astype(np.float32)[rows])
    np.testing.assert_allclose(scores, exact, rtol=1e-4, atol=1e-4)  # FP32 from the FP16 rows, as on CPU
    mask = np.random.default_rng(5).random(x.shape[0]) < 0.3
    _, rows = index.search(q, 10, bitmaps.from_bools(mask))
    assert mask[rows[rows >= 0]].all()
    few = bitmaps.from_rows(np.array([5, 17, 900]), x.shape[0])
    _, rows = index.exact_search(q[:2], 10, few)
    assert sorted(rows[0][rows[0] >= 0].tolist()) == [5, 17, 900] and (rows[:, 3:] == -1).all()


def test_cagra_is_never_asked_for_more_rows_than_it_has(gpu) -> None:
    x = _rows(200, 32)  # a graph (more rows than the intermediate degree), fewer rows than k
    index = _cagra(32)
    index.build(x)
    assert index._index is not None
    _, rows = index.search(_queries(x, 2), 300)
    assert (np.sort(rows[:, :200], axis=1) == np.arange(200)).all() and (rows[:, 200:] == -1).all()


def test_cuvs_gets_the_per_thread_stream_not_the_address_of_a_python_int(standin) -> None:
    from cuvs.common import CuvsException, Resources
    from cuvs.neighbors import cagra

    index = _cagra(32)
    index.build(_rows(1000, 32))
    assert index._resources().c_stream == standin.cuda.Stream.ptds.ptr == 2  # cudaStreamPerThread
    # what the old code did: Resources(stream=s.ptr) hands cuVS the address of the int object
    bad = Resources(stream=standin.cuda.Stream(non_blocking=False).ptr)
    q = standin.asarray(np.zeros((1, 32), np.float16))
    with pytest.raises(CuvsException, match="1863"):
        cagra.search(cagra.SearchParams(itopk_size=64), index._index, q, 10, resources=bad)


def test_the_rmm_pool_is_sized_from_free_memory(standin, monkeypatch) -> None:
    import rmm
    from gmco_shard.index.cuvs import _DevicePool

    gib = 1 << 30
    monkeypatch.setenv("GMCO_STANDIN_GPU_USED_BYTES", str(60 * gib))  # another process holds 60 of 80 GiB
    pool = _DevicePool()
    pool.ensure(CagraParams())
    assert pool.size == rmm.state.calls[-1]["initial_pool_size"] == CagraParams().pool_size(20 * gib)
    assert pool.size < 20 * gib
    with pytest.raises(MemoryError, match="pool"):  # sized from the total, as before: rmm refuses it
        rmm.reinitialize(pool_allocator=True, initial_pool_size=CagraParams().pool_size(80 * gib))


def test_the_cuda_probe_waits_on_its_own_stream_only(standin) -> None:
    from gmco_shard.gpu import CudaProbe

    probe = CudaProbe(cupy=standin)
    assert probe() and probe()
    events = standin.standin.events
    assert not [e for e in events if e[0] in ("deviceSynchronize", "device.synchronize")]
    gets = [ptr for what, ptr in events if what == "get"]
    assert len(gets) == 2 and all(ptr not in (None, 0, 2) for ptr in gets)  # a stream of its own


async def test_the_service_runs_on_the_cupy_backend(gpu, catalogue_dir) -> None:
    from gmco.shard.v1 import shard_service_pb2 as pb
    from gmco.shard.v1 import shard_service_pb2_grpc
    from gmco_common.vectors import encode_batch
    from shard_testkit import serve_shard, shard_settings

    async with serve_shard(shard_settings(catalogue_dir, index_backend="cupy")) as svc:
        stub = svc.stub(shard_service_pb2_grpc.ShardServiceStub)
        stats = await stub.GetStats(pb.GetStatsRequest())
        reply = await stub.Search(pb.SearchRequest(queries=encode_batch(np.eye(1, stats.dimension)), k=5))
    assert stats.index_backend == "cupy" and stats.item_count > 0
    assert len(reply.results[0].items) == 5


# -- what the session needs before any GPU call --------------------------------------------------------
def test_a_cuvs_that_cannot_load_says_why(monkeypatch) -> None:
    from gmco_shard.index import base
    from gmco_shard.index.cuvs_support import load_error

    missing = ImportError("No module named 'cuvs'", name="cuvs")
    assert load_error(missing) is missing  # the registry says which extra to install
    broken = ImportError("libcuvs_c.so: cannot open shared object file: No such file or directory",
                         name="cuvs.common.resources", path="/x/cuvs/common/resources.abi3.so")
    text = str(load_error(broken))
    assert load_error(broken).name is None and "LD_LIBRARY_PATH" in text
    old = ImportError("/x/libcuvs.so: undefined symbol: __nvJitLinkCreate_13_3, version libnvJitLink.so.13",
                      name="cuvs.neighbors.cagra.cagra", path="/x/cagra.abi3.so")
    assert "nvidia-nvjitlink>=13.3" in str(load_error(old))

    def fail(name):
        raise load_error(old)

    monkeypatch.setattr(base.importlib, "import_module", fail)
    with pytest.raises(ConfigError, match=r"installed but cannot load: .*__nvJitLinkCreate_13_3.*BACKEND=cupy"):
        base.backend_class("cuvs")


def test_a_library_loader_that_gives_up_is_a_clean_start_error(tmp_path) -> None:
    # What the real rmm 26.10 wheel did on a machine without libcufile: cuda.pathfinder raised a RuntimeError
    # (DynamicLibNotFoundError), not an ImportError, from inside `import rmm`.
    (tmp_path / "rmm").mkdir()
    (tmp_path / "rmm" / "__init__.py").write_text(
        "class DynamicLibNotFoundError(RuntimeError):\n    pass\n"
        "raise DynamicLibNotFoundError('Failure finding \"libcufile.so.0\": No such file: libcufile.so.0')\n")
    with gpu_libraries("standin"):
        sys.path.insert(0, str(tmp_path))
        try:
            from gmco_shard.index.base import backend_class

            with pytest.raises(ConfigError, match=r"cannot load: DynamicLibNotFoundError.*libcufile.*nvidia/cu13/lib"):
                backend_class("cuvs")
        finally:
            sys.path.remove(str(tmp_path))


def test_the_shard_imports_without_psycopg_or_faiss() -> None:
    # The device image has neither, and the GPU session carries neither.
    code = ("import sys\nfor m in ('psycopg', 'psycopg_pool', 'faiss'): sys.modules[m] = None\n"
            "import gmco_shard.servicer, gmco_shard.app, gmco_shard.index.exact, gmco_shard.gpu\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False,
                          env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    assert proc.returncode == 0, proc.stderr
