"""API probes of CuPy, rmm and cuVS on the device, each in its own process so that a crash loses nothing else.

    python3 scripts/gpu_session/probe.py all --out probe.json [--timeout 120] [--only a,b]
    python3 scripts/gpu_session/probe.py one NAME          # prints one JSON object

What each answers (the questions a careful reading of the 26.10 sources could not settle; see docs/gpu.md):

- ``libraries``: which libraries actually loaded, from where, at which version (a package that imports is
  not a library that loads: libcuvs's loader swallows dlopen errors, so libcuvs.so is opened directly), the
  libnvJitLink this process mapped, and whether the shard's ``cuvs`` and ``cupy`` backends load.
- ``stream``: CAGRA with ``Resources()`` (cudaStreamPerThread) and CuPy under ``Stream.ptds``: right results.
- ``stream_bug``: ``Resources(stream=cupy_stream.ptr)``, which 26.10 turns into the address of a Python int
  (NVIDIA/cuvs#1863): what happens (a crash here is the expected answer, and costs only this process).
- ``fp16_scores``: the error of CuPy's FP16 matrix product and of CAGRA's FP16 inner products against float64.
- ``bitset_recall``: CAGRA with the bitset pre-filter at 10% and 1% allowed: recall, and rows it should not return.
- ``padding``: what CAGRA and brute force put in result slots no allowed row fills.
- ``from_graph``: a graph saved and reattached with ``cagra.from_graph`` answers as the built index does.
- ``k_above_rows``: CAGRA and brute force asked for more neighbours than rows (the shard never asks).
- ``oom``: the exception types and texts of an allocation beyond an rmm pool, and ``is_out_of_memory`` on them.
- ``cupy_index``: the shard's ``cupy`` backend against numpy at 200,000 x 1024.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import json
import os
import subprocess
import sys
import time
import traceback
from pathlib import Path

import numpy as np

PROBES = {}
# Rehearsals on CPU stand-ins shrink the data (GMCO_PROBE_SCALE=0.05): the questions stay the same.
SCALE = float(os.environ.get("GMCO_PROBE_SCALE", "1"))


def probe(fn):
    PROBES[fn.__name__] = fn
    return fn


def _data(n: int, d: int, q: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    n = max(300, int(n * SCALE)) if n > 1000 else n
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, d), dtype=np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    queries = x[rng.integers(0, n, q)] + 0.3 * rng.standard_normal((q, d), dtype=np.float32) / np.sqrt(d)
    return x.astype(np.float16), queries.astype(np.float32)


def _exact(x: np.ndarray, q: np.ndarray, k: int, allowed: np.ndarray | None = None) -> np.ndarray:
    s = q.astype(np.float64) @ x.astype(np.float64).T
    if allowed is not None:
        s[:, ~allowed] = -np.inf
    return np.argsort(-s, axis=1, kind="stable")[:, :k]


def _recall(rows: np.ndarray, gt: np.ndarray) -> float:
    return float(np.mean([len(set(r[r >= 0].tolist()) & set(g.tolist())) / max(1, len(g))
                          for r, g in zip(rows, gt, strict=True)]))


def _cagra(x_dev, metric: str = "inner_product", res=None):
    from cuvs.neighbors import cagra

    return cagra.build(cagra.IndexParams(metric=metric, graph_degree=32, intermediate_graph_degree=64), x_dev,
                       resources=res)


def _search(index, q_dev, k: int, res=None, filt=None, itopk: int = 128):
    import cupy as cp
    from cuvs.neighbors import cagra

    dist = cp.empty((q_dev.shape[0], k), dtype=cp.float32)
    rows = cp.empty((q_dev.shape[0], k), dtype=cp.uint32)
    cagra.search(cagra.SearchParams(itopk_size=max(itopk, k), search_width=4), index, q_dev, k, neighbors=rows,
                 distances=dist, resources=res, filter=filt)
    return cp.asnumpy(dist), cp.asnumpy(rows).astype(np.int64)


def _bitset(allowed: np.ndarray):
    import cupy as cp
    from cuvs.neighbors import filters
    from gmco_shard import bitmaps
    from gmco_shard.index.cuvs_support import bitset

    return filters.from_bitset(cp.asarray(bitset(bitmaps.from_bools(allowed), allowed.shape[0])))


@probe
def libraries() -> dict:
    out: dict = {"env": {k: os.environ.get(k) for k in ("LD_LIBRARY_PATH", "LD_PRELOAD", "PYTHONPATH")}}
    for name in ("numpy", "cupy", "rmm", "pylibraft", "cuvs", "libcuvs", "libraft", "librmm", "pynvml", "grpc",
                 "google.protobuf", "pytest_asyncio", "opentelemetry.sdk", "gmco_kernels", "gmco.shard.v1"):
        try:
            m = importlib.import_module(name)
            ver = getattr(m, "__version__", None)
            if ver is None:
                try:
                    ver = importlib.metadata.version(name.split(".")[0].replace("_", "-"))
                except Exception:  # noqa: BLE001
                    ver = None
            out[name] = {"version": ver, "file": getattr(m, "__file__", None), "standin": getattr(m, "STANDIN", False)}
        except Exception as exc:  # noqa: BLE001 - the answer is the error
            out[name] = {"error": f"{type(exc).__name__}: {exc}"}
    try:
        from gmco_shard.index.cuvs_support import diagnose_libcuvs

        out["libcuvs.so"] = diagnose_libcuvs() or "loads (or no libcuvs wheel here)"
    except Exception as exc:  # noqa: BLE001
        out["libcuvs.so"] = f"{type(exc).__name__}: {exc}"
    try:
        import cupy as cp

        props = cp.cuda.runtime.getDeviceProperties(cp.cuda.runtime.getDevice())
        free, total = cp.cuda.runtime.memGetInfo()
        name = props.get("name", b"?")
        out["device"] = {"name": name.decode() if isinstance(name, bytes) else name, "free": free, "total": total,
                         "cc": f"{props.get('major')}.{props.get('minor')}",
                         "kernel_ok": int(cp.arange(10).sum()) == 45,
                         "ptds_ptr": int(cp.cuda.Stream.ptds.ptr), "runtime": cp.cuda.runtime.runtimeGetVersion(),
                         "driver": cp.cuda.runtime.driverGetVersion()}
    except Exception as exc:  # noqa: BLE001
        out["device"] = {"error": f"{type(exc).__name__}: {exc}"}
    out["mapped_nvjitlink"] = sorted({line.split()[-1] for line in Path("/proc/self/maps").read_text().splitlines()
                                      if "nvJitLink" in line}) if Path("/proc/self/maps").is_file() else None
    try:
        import ctypes

        lib = ctypes.CDLL("libnvJitLink.so.13")
        major, minor = ctypes.c_uint(), ctypes.c_uint()
        lib.nvJitLinkVersion(ctypes.byref(major), ctypes.byref(minor))
        out["nvjitlink_version"] = f"{major.value}.{minor.value}"
    except Exception as exc:  # noqa: BLE001
        out["nvjitlink_version"] = f"{type(exc).__name__}: {exc}"
    for backend in ("cupy", "cuvs"):
        try:
            from gmco_shard.index.base import backend_class

            cls = backend_class(backend)
            out[f"backend_{backend}"] = f"loads: {cls.__module__}.{cls.__name__}"
        except Exception as exc:  # noqa: BLE001
            out[f"backend_{backend}"] = f"{type(exc).__name__}: {exc}"
    return out


@probe
def stream() -> dict:
    import cupy as cp
    from cuvs.common import Resources

    x, q = _data(20_000, 128, 64)
    res = Resources()
    with cp.cuda.Stream.ptds:
        index = _cagra(cp.asarray(x), res=res)
        _, rows = _search(index, cp.asarray(q.astype(np.float16)), 10, res=res)
    return {"recall_at_10": _recall(rows, _exact(x, q, 10)), "ptds_ptr": int(cp.cuda.Stream.ptds.ptr)}


@probe
def stream_bug() -> dict:
    import cupy as cp
    from cuvs.common import Resources

    x, q = _data(5_000, 64, 8)
    s = cp.cuda.Stream(non_blocking=True)
    res = Resources(stream=s.ptr)
    with s:
        index = _cagra(cp.asarray(x), res=res)
        _, rows = _search(index, cp.asarray(q.astype(np.float16)), 10, res=res)
    res.sync()
    return {"survived": True, "recall_at_10": _recall(rows, _exact(x, q, 10))}


@probe
def fp16_scores() -> dict:
    import cupy as cp

    x, q = _data(50_000, 1024, 64)
    ref = q.astype(np.float64) @ x.astype(np.float64).T
    qh = q / np.linalg.norm(q, axis=1, keepdims=True)
    mm = cp.asnumpy(cp.matmul(cp.asarray(qh.astype(np.float16)), cp.asarray(x).T)).astype(np.float64)
    ref_unit = ref / np.linalg.norm(q, axis=1, keepdims=True)
    out = {"cupy_fp16_matmul_max_abs_error": float(np.abs(mm - ref_unit).max()),
           "cupy_fp16_matmul_rel_error": float(np.linalg.norm(mm - ref_unit) / np.linalg.norm(ref_unit))}
    index = _cagra(cp.asarray(x))
    dist, rows = _search(index, cp.asarray(q.astype(np.float16)), 10)
    want = np.take_along_axis(ref, rows, 1)
    out["cagra_ip_max_abs_error"] = float(np.abs(dist - want).max())
    out["cagra_ip_is_larger_better"] = bool((np.diff(dist, axis=1) <= 1e-6).all())
    return out


@probe
def bitset_recall() -> dict:
    import cupy as cp

    x, q = _data(50_000, 128, 100)
    index = _cagra(cp.asarray(x))
    rng = np.random.default_rng(1)
    out = {}
    for share in (0.1, 0.01):
        allowed = rng.random(x.shape[0]) < share
        _, rows = _search(index, cp.asarray(q.astype(np.float16)), 10, filt=_bitset(allowed))
        ok = rows[(rows >= 0) & (rows < x.shape[0])]
        out[f"allowed_{share}"] = {"recall_at_10": _recall(np.where(rows < x.shape[0], rows, -1),
                                                          _exact(x, q, 10, allowed)),
                                   "disallowed_returned": int((~allowed[ok]).sum()),
                                   "slots_out_of_range": int((rows >= x.shape[0]).sum())}
    return out


@probe
def padding() -> dict:
    import cupy as cp
    from cuvs.neighbors import brute_force

    x, q = _data(5_000, 64, 2)
    allowed = np.zeros(x.shape[0], bool)
    allowed[[5, 17, x.shape[0] - 1]] = True
    index = _cagra(cp.asarray(x))
    dist, rows = _search(index, cp.asarray(q.astype(np.float16)), 10, filt=_bitset(allowed))
    out = {"cagra": {"rows": rows[0].tolist(), "distances": dist[0].tolist()}}
    bf = brute_force.build(cp.asarray(x), metric="inner_product")
    d2 = cp.empty((2, 10), dtype=cp.float32)
    r2 = cp.empty((2, 10), dtype=cp.int64)
    brute_force.search(bf, cp.asarray(q.astype(np.float16)), 10, neighbors=r2, distances=d2, prefilter=_bitset(allowed))
    out["brute_force"] = {"rows": cp.asnumpy(r2)[0].tolist(), "distances": cp.asnumpy(d2)[0].tolist()}
    return out


@probe
def from_graph() -> dict:
    import cupy as cp
    from cuvs.neighbors import cagra

    x, q = _data(20_000, 128, 50)
    xd = cp.asarray(x)
    index = _cagra(xd)
    graph = cp.asarray(cp.asnumpy(cp.asarray(index.graph)))
    again = cagra.from_graph(graph, xd, metric="inner_product")
    qd = cp.asarray(q.astype(np.float16))
    _, a = _search(index, qd, 10)
    _, b = _search(again, qd, 10)
    return {"same_rows": float((a == b).mean()), "graph_shape": list(graph.shape)}


@probe
def k_above_rows() -> dict:
    import cupy as cp
    from cuvs.neighbors import brute_force

    x, q = _data(200, 64, 2)
    out = {}
    try:
        index = _cagra(cp.asarray(x))
        _, rows = _search(index, cp.asarray(q.astype(np.float16)), 300, itopk=320)
        out["cagra"] = {"rows_valid": int(((rows >= 0) & (rows < 200)).sum(axis=1)[0])}
    except Exception as exc:  # noqa: BLE001 - the answer is the error
        out["cagra"] = {"error": f"{type(exc).__name__}: {exc}"[:500]}
    try:
        bf = brute_force.build(cp.asarray(x), metric="inner_product")
        _, rows = brute_force.search(bf, cp.asarray(q.astype(np.float16)), 300)
        rows = cp.asnumpy(cp.asarray(rows))
        out["brute_force"] = {"rows_valid": int(((rows >= 0) & (rows < 200)).sum(axis=1)[0])}
    except Exception as exc:  # noqa: BLE001
        out["brute_force"] = {"error": f"{type(exc).__name__}: {exc}"[:500]}
    return out


@probe
def oom() -> dict:
    import cupy as cp
    import rmm
    from gmco_shard.index.cuvs_support import is_out_of_memory
    from rmm.allocators.cupy import rmm_cupy_allocator

    out = {}

    def attempt(what: str, fn) -> None:
        try:
            fn()
            out[what] = {"raised": None}
        except Exception as exc:  # noqa: BLE001 - the answer is the exception
            out[what] = {"type": f"{type(exc).__module__}.{type(exc).__qualname__}",
                         "mro": [c.__name__ for c in type(exc).__mro__], "text": str(exc)[:300],
                         "is_out_of_memory": is_out_of_memory(exc)}

    attempt("cupy_default_pool", lambda: cp.empty(1 << 50, dtype=cp.uint8))
    rmm.reinitialize(pool_allocator=True, initial_pool_size=1 << 30, maximum_pool_size=1 << 30)
    cp.cuda.set_allocator(rmm_cupy_allocator)
    attempt("rmm_pool", lambda: cp.empty(2 << 30, dtype=cp.uint8))
    x, _ = _data(200_000, 1024, 1)
    attempt("cagra_build_beyond_pool", lambda: _cagra(cp.asarray(x)))
    return out


@probe
def cupy_index() -> dict:
    from gmco_shard import bitmaps
    from gmco_shard.index.cupy import CupyIndex
    from gmco_shard.index.params import IndexParams

    x, q = _data(200_000, 1024, 20)
    index = CupyIndex(x.shape[1], IndexParams())
    index.build(x)
    s, rows = index.search(q, 10)
    gt = _exact(x, q, 10)
    ref = np.take_along_axis(q.astype(np.float64) @ x.astype(np.float64).T, gt, 1)
    allowed = np.random.default_rng(2).random(x.shape[0]) < max(0.01, 30 / x.shape[0])
    _, frows = index.search(q, 10, bitmaps.from_bools(allowed))
    out = {"recall_at_10": _recall(rows, gt), "score_max_abs_error": float(np.abs(s - ref).max()),
           "filtered_1pct_recall_at_10": _recall(frows, _exact(x, q, 10, allowed)),
           "filtered_disallowed_returned": int((~allowed[frows[frows >= 0]]).sum())}
    for batch in (1, 100):
        qb = q[np.arange(batch) % len(q)]
        index.search(qb, 10)
        t = time.perf_counter()
        for _ in range(5):
            index.search(qb, 10)
        out[f"ms_per_search_batch{batch}"] = (time.perf_counter() - t) / 5 * 1e3
    return out


def run_one(name: str) -> int:
    start = time.perf_counter()
    try:
        result = {"ok": True, "result": PROBES[name]()}
    except Exception as exc:  # noqa: BLE001 - reported, not raised
        result = {"ok": False, "error": f"{type(exc).__name__}: {exc}"[:2000],
                  "traceback": traceback.format_exc()[-3000:]}
    result["seconds"] = round(time.perf_counter() - start, 2)
    print("PROBE-RESULT " + json.dumps(result, default=str), flush=True)
    return 0


def _run_probe(name: str, timeout: float) -> dict:
    start = time.perf_counter()
    try:
        proc = subprocess.run([sys.executable, __file__, "one", name], capture_output=True, text=True,
                              timeout=timeout, check=False)
        line = next((ln for ln in reversed(proc.stdout.splitlines()) if ln.startswith("PROBE-RESULT ")), None)
        entry = json.loads(line[len("PROBE-RESULT "):]) if line else {"ok": False, "error": "no result: the "
                                                                      "process died"}
        entry["returncode"] = proc.returncode
        if proc.returncode != 0 or not entry.get("ok"):
            entry["stderr_tail"] = proc.stderr[-2000:]
    except subprocess.TimeoutExpired as exc:
        tail = exc.stderr.decode(errors="replace") if isinstance(exc.stderr, bytes) else str(exc.stderr or "")
        entry = {"ok": False, "error": f"timed out after {timeout} s", "stderr_tail": tail[-2000:]}
    entry["wall_seconds"] = round(time.perf_counter() - start, 2)
    return entry


def run_all(out: Path, timeout: float, only: list[str] | None, jobs: int = 1) -> int:
    """Every probe in its own process, one after the other on a GPU (``jobs`` > 1 only for rehearsals);
    the results file is rewritten after each, so a session cut short keeps what was answered."""
    from concurrent.futures import ThreadPoolExecutor

    names = only or list(PROBES)
    results: dict = {}
    with ThreadPoolExecutor(max(1, jobs)) as pool:
        for name, entry in zip(names, pool.map(lambda n: _run_probe(n, timeout), names), strict=True):
            results[name] = entry
            status = "ok" if entry.get("ok") else f"FAILED ({entry.get('error', '')[:120]})"
            print(f"probe {name:14s} {entry['wall_seconds']:6.1f} s  {status}", flush=True)
            out.write_text(json.dumps(results, indent=1, default=str))
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    one = sub.add_parser("one")
    one.add_argument("name", choices=sorted(PROBES))
    every = sub.add_parser("all")
    every.add_argument("--out", type=Path, required=True)
    every.add_argument("--timeout", type=float, default=120.0)
    every.add_argument("--only", default="")
    every.add_argument("--jobs", type=int, default=1)
    a = ap.parse_args()
    if a.cmd == "one":
        return run_one(a.name)
    return run_all(a.out, a.timeout, [n for n in a.only.split(",") if n] or None, a.jobs)


if __name__ == "__main__":
    sys.exit(main())
