"""The GPU session rehearsed on CPU: ``scripts/gpu-session.sh rehearse`` calls ``prepare``, runs the session
against what it prepared, then ``verify``.

``prepare --dir D`` makes what a device would have and what would be carried to it:

- ``D/wheels/wheels``: wheels of the stand-ins of what the payload carries (cuvs-cu13, rmm-cu13,
  pylibraft-cu13, libcuvs-cu13 at 26.10.0) and three made-up distributions that test the version-aware
  install: one the "image" lacks, one it has older than carried (both installed), one it has newer (kept);
  ``D/wheels/extra``: an nvidia-nvjitlink 13.5.37 wheel without its library (installed: this machine has none).
- ``D/image``: the "device image": the CuPy and NVML stand-ins, and the older and newer made-up versions.
- ``D/blocker/sitecustomize.py``: hides what the device image lacks and the session does not carry
  (psycopg, faiss, redis, ...), so that an import of one of them fails here as it would there.

``verify --dir D`` checks the session's files under ``D/out``: at most 8, the install decisions, every probe
answered (the stream-bug probe must fail: the stand-in reproduces NVIDIA/cuvs#1863), the gpu tests ran
and passed on the stand-ins, and the benchmark JSON has the keys the issue asks for.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import sys
import xml.etree.ElementTree as ET
import zipfile
from pathlib import Path

STANDINS = Path(__file__).resolve().parents[1] / "gpu-standins"
CARRIED = {"cuvs-cu13": ("cuvs", "26.10.0"), "rmm-cu13": ("rmm", "26.10.0"),
           "pylibraft-cu13": ("pylibraft", "26.10.0"), "libcuvs-cu13": ("libcuvs", "26.10.0")}
VERSIONS = {"gmco-rehearsal-absent": ("1.0", None), "gmco-rehearsal-older": ("2.0", "1.0"),
            "gmco-rehearsal-newer": ("1.0", "3.0")}  # carried, on the "image"
HIDDEN = ("psycopg", "psycopg_pool", "psycopg_binary", "faiss", "redis", "neo4j", "pymilvus", "milvus_lite",
          "tenacity")
OUT_FILES = {"session.log", "install.json", "probe.json", "pytest.log", "pytest.xml", "bench.log", "bench_gpu.json"}
BENCH_KEYS = ("gpu_name", "cagra_build_seconds", "cagra_sweep", "exact_qps_batch1000", "exact_roofline_fraction",
              "exact_batch1_over_hbm_floor", "cagra_filtered", "grpc_p50_ms_batch1")

_BLOCKER = '''"""Rehearsal only: the device image has none of these, and the GPU session does not carry them."""
import importlib.abc
import sys

HIDDEN = {hidden!r}


class _Hide(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in HIDDEN:
            raise ModuleNotFoundError(f"No module named {{name!r}} (not on the device image)", name=name)
        return None


sys.meta_path.insert(0, _Hide())
'''


def _dist_info(name: str, version: str) -> dict[str, str]:
    info = f"{name.replace('-', '_')}-{version}.dist-info"
    return {f"{info}/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n",
            f"{info}/WHEEL": "Wheel-Version: 1.0\nGenerator: gmco-rehearsal\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
            f"{info}/RECORD": ""}


def _wheel(out: Path, name: str, version: str, files: dict[str, str | bytes]) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{name.replace('-', '_')}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        for arc, data in {**files, **_dist_info(name, version)}.items():
            zf.writestr(arc, data)
    return path


def _tree(package: str) -> dict[str, bytes]:
    root = STANDINS / package
    if root.is_file():
        return {root.name: root.read_bytes()}
    return {str(p.relative_to(STANDINS)): p.read_bytes() for p in root.rglob("*.py")}


def prepare(d: Path) -> None:
    if d.exists():
        for sub in ("wheels", "image", "blocker", "session", "device-session", "out", "site", "stage"):
            shutil.rmtree(d / sub, ignore_errors=True)
    wheels = d / "wheels" / "wheels"
    for dist, (package, version) in CARRIED.items():
        _wheel(wheels, dist, version, _tree(package))
    for dist, (carried, _) in VERSIONS.items():
        module = dist.replace("-", "_")
        _wheel(wheels, dist, carried, {f"{module}.py": f"VERSION = {carried!r}\n"})
    _wheel(d / "wheels" / "extra", "nvidia-nvjitlink", "13.5.37",
           {"nvidia/cu13/lib/README": "the rehearsal carries no libnvJitLink.so.13\n"})
    image = d / "image"
    image.mkdir(parents=True)
    shutil.copytree(STANDINS / "cupy", image / "cupy")
    shutil.copy(STANDINS / "pynvml.py", image / "pynvml.py")
    for dist, (_, there) in VERSIONS.items():
        if there:
            for arc, text in _dist_info(dist, there).items():
                (image / arc).parent.mkdir(parents=True, exist_ok=True)
                (image / arc).write_text(text)
            (image / f"{dist.replace('-', '_')}.py").write_text(f"VERSION = {there!r}\n")
    (d / "blocker").mkdir(parents=True)
    (d / "blocker" / "sitecustomize.py").write_text(_BLOCKER.format(hidden=HIDDEN))
    print(f"rehearsal: prepared {d}")


def verify(d: Path) -> int:
    out = d / "out"
    problems: list[str] = []
    files = {p.name for p in out.iterdir()}
    if len(files) > 8:
        problems.append(f"{len(files)} files under $OUT, more than the 8 that come back: {sorted(files)}")
    if missing := OUT_FILES - files:
        problems.append(f"missing under $OUT: {sorted(missing)}")
    bad_names = [f for f in files if not re.fullmatch(r"[A-Za-z0-9._-]+", f)]
    if bad_names:
        problems.append(f"names the tool will not bring back: {bad_names}")
    if (out / "install.json").is_file():
        report = json.loads((out / "install.json").read_text())
        for dist in ("gmco-rehearsal-absent", "gmco-rehearsal-older", "nvidia-nvjitlink", *CARRIED):
            if dist not in report["installed"]:
                problems.append(f"install: {dist} should have been installed: {report}")
        if "gmco-rehearsal-newer" not in report["kept"]:
            problems.append(f"install: the image's newer gmco-rehearsal-newer should have been kept: {report}")
    if (out / "probe.json").is_file():
        probes = json.loads((out / "probe.json").read_text())
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from probe import PROBES

        for name in PROBES:
            entry = probes.get(name)
            if entry is None:
                problems.append(f"probe {name}: no answer")
            elif name == "stream_bug":
                if entry.get("ok") or "1863" not in entry.get("error", ""):
                    problems.append(f"probe stream_bug: the stand-in should refuse the address of a Python int: "
                                    f"{entry}")
            elif not entry.get("ok"):
                problems.append(f"probe {name}: {entry.get('error')}")
        libs = probes.get("libraries", {}).get("result", {})
        if not libs.get("cupy", {}).get("standin"):
            problems.append(f"probe libraries: the CuPy stand-in did not load: {libs.get('cupy')}")
        if "loads" not in str(libs.get("backend_cuvs")) or "loads" not in str(libs.get("backend_cupy")):
            problems.append(f"probe libraries: a backend did not load: cuvs {libs.get('backend_cuvs')}, cupy "
                            f"{libs.get('backend_cupy')}")
    if (out / "pytest.xml").is_file():
        suite = ET.parse(out / "pytest.xml").getroot()
        suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
        tests, fails, errors, skipped = (int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped"))
        if tests == 0 or fails or errors or skipped == tests:
            problems.append(f"gpu tests: {tests} run, {fails} failed, {errors} errors, {skipped} skipped (see pytest.log)")
    if (out / "bench_gpu.json").is_file():
        bench = json.loads((out / "bench_gpu.json").read_text())
        if bench.get("errors"):
            problems.append(f"bench errors: {bench['errors']}")
        if missing_keys := [k for k in BENCH_KEYS if k not in bench]:
            problems.append(f"bench_gpu.json lacks {missing_keys}")
        for row in bench.get("cagra_sweep", []):
            if "recall_at_10" not in row or not row.get("qps"):
                problems.append(f"bench cagra_sweep row without recall_at_10 / qps by batch: {row}")
    for p in problems:
        print("rehearsal FAILED:", p)
    if not problems:
        print(f"rehearsal passed: {len(files)} files under $OUT ({', '.join(sorted(files))}); install, probe, gpu "
              "tests and bench all ran on the stand-ins (no GPU figure)")
    return 1 if problems else 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("cmd", choices=("prepare", "verify"))
    ap.add_argument("--dir", type=Path, required=True)
    a = ap.parse_args()
    if a.cmd == "prepare":
        prepare(a.dir)
        return 0
    return verify(a.dir)


if __name__ == "__main__":
    sys.exit(main())
