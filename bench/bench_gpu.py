"""python3 bench/bench_gpu.py: the shard's GPU backends on one NVIDIA GPU (docs/gpu.md).

On a lent device machine run it as ``python3 bench/bench_gpu.py`` (``scripts/gpu-session.sh device`` does):
``make bench-gpu`` needs a package index. Sections run in order, each on its own: one that fails records
its error under ``errors`` and the rest still run, and the JSON is rewritten after each, so a run cut short
keeps what it measured.

- ``device``: the card's name and memory, and the two ceilings measured on it: an FP16 matrix product
  through CuPy (8192^3, tensor cores) and a device-to-device copy (bytes read plus written).
- ``exact``: the ``cupy`` backend (exact FP16 search) over ``--items`` x ``--dim``: QPS at batch 1, 100 and
  1,000; at batch 1,000 the share of the FP16 tensor-core roofline (2 n d flops a query, over the
  datasheet's dense peak and over the measured product); at batch 1 the time over the HBM floor (the
  shard's bytes over the datasheet's and the measured bandwidth). Its results are the ground truth below.
- ``cagra`` (when cuVS loads): build seconds; per ``itopk_size``: recall@10 and QPS at batch 1, 100 and
  10,000; filtered recall@10 and QPS at 10% and 1% allowed (CAGRA's bitset pre-filter), and the exact
  path at 1%.
- ``grpc``: a shard in this process (``gmco_shard.app.start``) over ``--grpc-items`` rows: batch-1 Search
  latency through a real channel, alone and with 16 concurrent callers under micro-batching (1 ms).

A batch of b queries is always b rows (queries are reused cyclically when ``--queries`` is smaller), so
QPS counts queries that ran. Writes ``--out`` (default bench/results/bench_gpu.json). Without a GPU
(no nvidia-smi) it exits 2 and measures nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import sys
import tempfile
import time
import traceback
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, machine

# Dense FP16 tensor-core peak (TFLOP/s, no sparsity) and HBM bandwidth (TB/s), from the vendors' datasheets.
ROOFLINE_TFLOPS = {"H100 SXM": 989.0, "H100 PCIe": 756.0, "H100 NVL": 835.0, "H200": 989.0, "A100": 312.0,
                   "L40S": 362.0, "L4": 121.0, "A10": 125.0, "T4": 65.0}
HBM_TBPS = {"H100 SXM": 3.35, "H100 PCIe": 2.0, "H100 NVL": 3.9, "H200": 4.8, "A100": 2.0, "L40S": 0.864,
            "L4": 0.3, "A10": 0.6, "T4": 0.32}


def datasheet(table: dict[str, float], name: str) -> float | None:
    for key, value in sorted(table.items(), key=lambda kv: -len(kv[0])):
        if all(part in name for part in key.split()):
            return value
    return None


def roofline(name: str) -> float | None:
    return datasheet(ROOFLINE_TFLOPS, name)


def batch_of(queries: np.ndarray, batch: int) -> np.ndarray:
    """Exactly ``batch`` query rows, reusing the queries cyclically when there are fewer."""
    return queries[np.arange(batch) % queries.shape[0]]


def rate(fn, batch: int, seconds: float) -> dict[str, float]:
    """Queries per second of ``fn()`` (one batch of ``batch`` rows a call, results on the host), and the
    median seconds per call, after one warm-up call."""
    fn()
    times = []
    start = time.perf_counter()
    while time.perf_counter() - start < seconds or len(times) < 3:
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    total = sum(times)
    return {"qps": len(times) * batch / total, "median_s": float(np.median(times)), "calls": len(times)}


def recall(rows: np.ndarray, gt: np.ndarray) -> float:
    return float(np.mean([len(set(r[r >= 0].tolist()) & set(g[g >= 0].tolist())) / max(1, int((g >= 0).sum()))
                          for r, g in zip(rows, gt, strict=True)]))


class Run:
    def __init__(self, out: Path, args: argparse.Namespace) -> None:
        self.out = out
        self.doc: dict = {"machine": machine(), "args": vars(args), "errors": {}, "sections_seconds": {}}

    def section(self, name: str, fn) -> None:
        start = time.perf_counter()
        print(f"-- {name}", flush=True)
        try:
            fn()
        except Exception as exc:  # noqa: BLE001 - recorded; the other sections still run
            self.doc["errors"][name] = f"{type(exc).__name__}: {exc}"[:2000]
            traceback.print_exc()
        self.doc["sections_seconds"][name] = round(time.perf_counter() - start, 1)
        self.save()

    def save(self) -> None:
        self.doc["finished_at"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self.out.write_text(json.dumps(self.doc, indent=2, default=_jsonable))


def _jsonable(value):
    return value.item() if isinstance(value, np.generic) else str(value)


def measure_device(run: Run) -> None:
    import cupy as cp

    props = cp.cuda.runtime.getDeviceProperties(cp.cuda.runtime.getDevice())
    name = props.get("name", b"?")
    name = name.decode() if isinstance(name, bytes) else str(name)
    try:
        import pynvml

        pynvml.nvmlInit()
        nv = pynvml.nvmlDeviceGetName(pynvml.nvmlDeviceGetHandleByIndex(0))
        name = nv.decode() if isinstance(nv, bytes) else nv
    except Exception:  # noqa: BLE001, S110 - CuPy's name will do
        pass
    free, total = cp.cuda.runtime.memGetInfo()
    run.doc.update(gpu_name=name, gpu_memory_bytes=int(total), gpu_free_bytes=int(free),
                   datasheet_fp16_tflops=roofline(name), datasheet_hbm_tbps=datasheet(HBM_TBPS, name))

    def timed(fn, reps: int) -> float:
        fn()
        start, end = cp.cuda.Event(), cp.cuda.Event()
        start.record()
        for _ in range(reps):
            fn()
        end.record()
        end.synchronize()
        return cp.cuda.get_elapsed_time(start, end) / 1e3 / reps

    n = run.doc["args"]["ceiling_n"]
    rng = np.random.default_rng(0)
    left = cp.asarray(rng.standard_normal((n, n), dtype=np.float32).astype(np.float16))
    right = cp.asarray(rng.standard_normal((n, n), dtype=np.float32).astype(np.float16))
    seconds = timed(lambda: cp.matmul(left, right), 10)
    run.doc["measured_fp16_tflops"] = 2 * n**3 / seconds / 1e12
    src = cp.asarray(rng.random(run.doc["args"]["copy_mib"] << 18, dtype=np.float32))
    dst = cp.empty_like(src)
    seconds = timed(lambda: cp.copyto(dst, src), 10)
    run.doc["measured_copy_tbps"] = 2 * src.nbytes / seconds / 1e12
    print(f"{name}: FP16 matmul {run.doc['measured_fp16_tflops']:.0f} TFLOP/s, copy "
          f"{run.doc['measured_copy_tbps']:.2f} TB/s", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--items", type=int, default=1_000_000)
    ap.add_argument("--dim", type=int, default=1024)
    ap.add_argument("--queries", type=int, default=10_000)
    ap.add_argument("--itopk", type=int, nargs="+", default=[32, 64, 128, 256])
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 100, 10_000])
    ap.add_argument("--seconds", type=float, default=1.0, help="timing per measurement")
    ap.add_argument("--ceiling-n", type=int, default=8192, help="n of the n^3 FP16 product that measures the ceiling")
    ap.add_argument("--copy-mib", type=int, default=1024, help="MiB copied to measure the bandwidth")
    ap.add_argument("--grpc-items", type=int, default=100_000)
    ap.add_argument("--grpc-calls", type=int, default=2000)
    ap.add_argument("--skip", nargs="*", default=[], choices=["exact", "cagra", "grpc"])
    ap.add_argument("--out", type=Path, default=RESULTS / "bench_gpu.json")
    a = ap.parse_args()
    if shutil.which("nvidia-smi") is None:
        print("bench-gpu: no NVIDIA GPU here (nvidia-smi not found); run it on a GPU machine, see docs/gpu.md",
              file=sys.stderr)
        sys.exit(2)
    try:
        import cupy  # noqa: F401
    except ImportError as exc:
        sys.exit(f"bench-gpu: {exc.name} missing; the device image has CuPy, elsewhere install cupy-cuda13x")
    from gmco_common.datagen import generate_catalogue, generate_queries

    run = Run(a.out, a)
    run.section("device", lambda: measure_device(run))
    state: dict = {}

    def data() -> None:
        cat = generate_catalogue(a.items, a.dim, seed=0, progress=False)
        state["cat"] = cat
        state["vectors"] = np.asarray(cat.vectors)
        state["queries"] = generate_queries(cat, a.queries, seed=5)
        run.doc["items"], run.doc["dim"], run.doc["queries"] = a.items, a.dim, a.queries

    run.section("data", data)
    if "exact" not in a.skip:
        run.section("exact", lambda: bench_exact(run, state, a))
    if "cagra" not in a.skip:
        run.section("cagra", lambda: bench_cagra(run, state, a))
    if "grpc" not in a.skip:
        run.section("grpc", lambda: bench_grpc(run, a))
    print("wrote", a.out)
    summary = {k: run.doc.get(k) for k in ("gpu_name", "exact_qps_batch1000", "exact_roofline_fraction",
                                           "exact_batch1_over_hbm_floor", "cagra_build_seconds",
                                           "grpc_p50_ms_batch1")}
    print(json.dumps(summary, default=_jsonable))
    if run.doc["errors"]:
        print("errors:", json.dumps(run.doc["errors"], indent=1))


def bench_exact(run: Run, state: dict, a: argparse.Namespace) -> None:
    from gmco_shard.index.cupy import CupyIndex
    from gmco_shard.index.params import IndexParams

    vectors, queries = state["vectors"], state["queries"]
    index = CupyIndex(a.dim, IndexParams())
    t = time.perf_counter()
    index.build(vectors)
    run.doc["exact_upload_seconds"] = time.perf_counter() - t
    # Ground truth for the recall figures: the exact search itself, checked against numpy on a sample.
    gt = np.concatenate([index.exact_search(queries[i:i + 4096], 10)[1] for i in range(0, len(queries), 4096)])
    state["gt"] = gt
    from gmco_common.datagen import exact_ground_truth

    run.doc["exact_gt_agreement_numpy_sample"] = recall(gt[:16], exact_ground_truth(vectors, queries[:16], 10))
    qps = {}
    for batch in (1, 100, 1000):
        q = batch_of(queries, batch)
        qps[str(batch)] = rate(lambda q=q: index.exact_search(q, 10), batch, a.seconds)
    run.doc["exact_qps"] = {b: v["qps"] for b, v in qps.items()}
    run.doc["exact_qps_batch1000"] = qps["1000"]["qps"]
    tflops = qps["1000"]["qps"] * 2 * a.items * a.dim / 1e12
    run.doc["exact_tflops_batch1000"] = tflops
    peak = run.doc.get("datasheet_fp16_tflops")
    run.doc["exact_roofline_fraction"] = tflops / peak if peak else None
    measured = run.doc.get("measured_fp16_tflops")
    run.doc["exact_measured_matmul_fraction"] = tflops / measured if measured else None
    shard_bytes = a.items * a.dim * 2
    run.doc["exact_batch1_ms"] = qps["1"]["median_s"] * 1e3
    hbm = run.doc.get("datasheet_hbm_tbps")
    run.doc["exact_batch1_over_hbm_floor"] = qps["1"]["median_s"] / (shard_bytes / (hbm * 1e12)) if hbm else None
    copy = run.doc.get("measured_copy_tbps")
    run.doc["exact_batch1_over_measured_bandwidth_floor"] = (qps["1"]["median_s"] / (shard_bytes / (copy * 1e12))
                                                             if copy else None)
    print({k: run.doc[k] for k in ("exact_qps", "exact_roofline_fraction", "exact_batch1_ms",
                                   "exact_batch1_over_hbm_floor")}, flush=True)
    index.retire()


def bench_cagra(run: Run, state: dict, a: argparse.Namespace) -> None:
    from gmco_shard import bitmaps
    from gmco_shard.index.base import backend_class
    from gmco_shard.index.params import IndexParams

    vectors, queries = state["vectors"], state["queries"]
    gt = state.get("gt")
    cls = backend_class("cuvs")
    index = cls(a.dim, IndexParams())
    t = time.perf_counter()
    index.build(vectors)
    run.doc["cagra_build_seconds"] = time.perf_counter() - t
    if gt is None:
        gt = np.concatenate([index.exact_search(queries[i:i + 4096], 10)[1] for i in range(0, len(queries), 4096)])
    sweep = []
    run.doc["cagra_sweep"] = sweep
    for itopk in a.itopk:
        row: dict = {"itopk_size": itopk}
        rows = np.concatenate([index.search(queries[i:i + 4096], 10, ef=itopk)[1]
                               for i in range(0, len(queries), 4096)])
        row["recall_at_10"] = recall(rows, gt)
        row["qps"] = {}
        for batch in a.batches:
            q = batch_of(queries, batch)
            row["qps"][str(batch)] = rate(lambda q=q, itopk=itopk: index.search(q, 10, ef=itopk), batch,
                                          a.seconds)["qps"]
        sweep.append(row)
        print(row, flush=True)
        run.save()
    from gmco_common.datagen import exact_ground_truth

    rng = np.random.default_rng(7)
    filtered = {}
    fq = batch_of(queries, 1000)
    for share in (0.1, 0.01):
        allowed = rng.random(a.items) < share
        allow = bitmaps.from_bools(allowed)
        _, fgt = index.exact_search(fq, 10, allow)  # the exact path's answer, checked on a sample
        entry = {"exact_agreement_numpy_sample": recall(fgt[:16], exact_ground_truth(vectors, fq[:16], 10, allowed))}
        _, rows = index.search(fq, 10, allow)
        entry["cagra_recall_at_10"] = recall(rows, fgt)
        entry["cagra_disallowed_returned"] = int((~allowed[rows[rows >= 0]]).sum())
        entry["cagra_qps_batch1000"] = rate(lambda allow=allow: index.search(fq, 10, allow), len(fq), a.seconds)["qps"]
        entry["exact_qps_batch1000"] = rate(lambda allow=allow: index.exact_search(fq, 10, allow), len(fq),
                                            a.seconds)["qps"]
        filtered[f"{share:.0%}"] = entry
        print(share, entry, flush=True)
    run.doc["cagra_filtered"] = filtered
    index.retire()


def bench_grpc(run: Run, a: argparse.Namespace) -> None:
    from gmco_common.datagen import generate_catalogue, generate_queries, save_catalogue
    from gmco_shard.index.base import backend_class

    try:
        backend_class("cuvs")
        backend = "cuvs"
    except Exception:  # noqa: BLE001 - cuVS cannot load: the CuPy backend serves
        backend = "cupy"
    directory = Path(tempfile.mkdtemp(prefix="bench-gpu-"))
    try:
        cat = generate_catalogue(a.grpc_items, a.dim, seed=1)
        save_catalogue(cat, directory)
        queries = generate_queries(cat, 256, seed=2)
        run.doc["grpc"] = asyncio.run(_grpc(directory, queries, backend, a))
        run.doc["grpc_p50_ms_batch1"] = run.doc["grpc"]["alone"]["p50_ms"]
        print(run.doc["grpc"], flush=True)
    finally:
        shutil.rmtree(directory, ignore_errors=True)


async def _grpc(directory: Path, queries: np.ndarray, backend: str, a: argparse.Namespace) -> dict:
    from gmco.shard.v1 import shard_service_pb2 as pb
    from gmco.shard.v1 import shard_service_pb2_grpc
    from gmco_common.vectors import encode_batch
    from gmco_shard.app import start
    from gmco_shard.config import Settings
    from gmco_testing.component import component

    settings = Settings(port=0, dim=a.dim, data_dir=directory, index_backend=backend, batch_window_ms=1.0,
                        batch_max=1024)
    requests = [pb.SearchRequest(queries=encode_batch(queries[i:i + 1]), k=10) for i in range(len(queries))]
    out: dict = {"backend": backend, "items": a.grpc_items}
    async with component(start, settings) as svc:
        stub = svc.stub(shard_service_pb2_grpc.ShardServiceStub)
        for r in requests[:50]:
            await stub.Search(r)
        lat = []
        for i in range(a.grpc_calls):
            t = time.perf_counter()
            await stub.Search(requests[i % len(requests)])
            lat.append(time.perf_counter() - t)
        out["alone"] = _latency(lat)
        lat = []

        async def caller(j: int) -> None:
            for i in range(a.grpc_calls // 16):
                t = time.perf_counter()
                await stub.Search(requests[(i * 16 + j) % len(requests)])
                lat.append(time.perf_counter() - t)

        t = time.perf_counter()
        await asyncio.gather(*(caller(j) for j in range(16)))
        out["concurrent16"] = {**_latency(lat), "qps": len(lat) / (time.perf_counter() - t)}
    return out


def _latency(lat: list[float]) -> dict[str, float]:
    s = sorted(lat)
    return {"p50_ms": s[len(s) // 2] * 1e3, "p99_ms": s[min(len(s) - 1, int(len(s) * 0.99))] * 1e3,
            "calls": len(s)}


if __name__ == "__main__":
    main()
