"""The GPU session's preparation, on CPU: version-aware installs, the payload's parts, the fatbin pruning, the
abi3 build of the kernels the device's python loads, and the whole session rehearsed on the stand-ins
(scripts/gpu-session.sh rehearse: pack, transfers, install, import check, API probe, gpu tests, bench)."""

from __future__ import annotations

import os
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[3]
sys.path.insert(0, str(ROOT / "scripts" / "gpu_session"))
import payload
import rehearse


@pytest.mark.parametrize(("installed", "carried", "floor", "install"), [
    (None, "1.0", None, True),
    ("13.0.88", "13.5.37", "13.3", True),  # the image's nvJitLink is too old for libcuvs 26.10
    ("13.6.1", "13.5.37", "13.3", False),
    ("13.3", "13.5.37", "13.3", False),  # new enough: the image's own is kept, not shadowed
    ("1.80.0", "1.85.1", "1.85.1", True),
    ("1.86.0", "1.85.1", "1.85.1", False),
    ("7.34.0", "7.36.2", "7.35.1", True),
    ("2.11.0+cu130", "2.11.0", None, False),
    ("0.66b2", "0.66", None, True),  # a pre-release sorts before its release
    ("26.10.0", "26.10", None, False),
])
def test_install_only_what_is_missing_or_too_old(installed, carried, floor, install) -> None:
    assert payload.needs_install(installed, carried, floor) is install


def _fake_image(tmp_path: Path) -> tuple[Path, Path]:
    """Wheels of the made-up distributions, and an "image" that has the older and the newer one."""
    wheels = tmp_path / "wheels"
    for dist, (carried, _) in rehearse.VERSIONS.items():
        rehearse._wheel(wheels, dist, carried, {f"{dist.replace('-', '_')}.py": f"VERSION = {carried!r}\n"})
    image = tmp_path / "image"
    for dist, (_, there) in rehearse.VERSIONS.items():
        if there:
            for arc, text in rehearse._dist_info(dist, there).items():
                (image / arc).parent.mkdir(parents=True, exist_ok=True)
                (image / arc).write_text(text)
    return wheels, image


def test_gpu_wheels_install_skips_only_versions_new_enough(tmp_path) -> None:
    _, image = _fake_image(tmp_path)
    shim = tmp_path / "bin"
    shim.mkdir()
    (shim / "python3").symlink_to(sys.executable)  # the script calls python3: this test's interpreter
    env = {**os.environ, "PATH": f"{shim}:{os.environ['PATH']}", "PYTHONPATH": str(image),
           "GPU_WHEELS_DIR": str(tmp_path), "GPU_WHEELS_TARGET": str(tmp_path / "site")}
    proc = subprocess.run(["bash", str(ROOT / "scripts" / "gpu-wheels.sh"), "install"], env=env, capture_output=True,
                          text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr
    installed = {p.name for p in (tmp_path / "site").iterdir() if p.suffix == ".py"}
    assert installed == {"gmco_rehearsal_absent.py", "gmco_rehearsal_older.py"}
    assert "already installed: gmco-rehearsal-newer 3.0" in proc.stderr


def test_payload_parts_are_checked_and_installed_version_aware(tmp_path, monkeypatch) -> None:
    wheels, image = _fake_image(tmp_path)
    session = tmp_path / "session"
    manifest = payload.pack(sorted(wheels.glob("*.whl")), session, part_mib=0.0005, max_parts=9, preset=1)
    assert len(manifest["pieces"]) >= 2
    last = session / manifest["pieces"][-1]["name"]
    kept = last.read_bytes()
    last.unlink()
    assert payload.check_parts(session)[1] == [f"{manifest['pieces'][-1]['name']} (missing)"]
    last.write_bytes(kept[:-1] + bytes([kept[-1] ^ 1]))
    assert payload.check_parts(session)[1] == [f"{manifest['pieces'][-1]['name']} (damaged)"]
    with pytest.raises(SystemExit, match="carry them again"):
        payload.install(session, tmp_path / "site", tmp_path / "stage")
    last.write_bytes(kept)
    monkeypatch.syspath_prepend(str(image))  # the image's versions, as importlib.metadata sees them
    report = payload.install(session, tmp_path / "site", tmp_path / "stage")
    assert set(report["installed"]) == {"gmco-rehearsal-absent", "gmco-rehearsal-older"}
    assert report["kept"]["gmco-rehearsal-newer"]["device_has"] == "3.0"
    with pytest.raises(SystemExit, match="more than 1"):
        payload.pack(sorted(wheels.glob("*.whl")), tmp_path / "s2", part_mib=0.0005, max_parts=1, preset=1)


def _elf_with_fatbin(containers: list[list[tuple[int, bytes]]]) -> bytes:
    """A minimal ELF64 file whose .nv_fatbin section holds fatbin containers of (arch, payload) entries."""
    fatbin = b""
    for entries in containers:
        body = b""
        for arch, data in entries:
            header = bytearray(64)
            struct.pack_into("<HHIQ", header, 0, 2, 0x0101, 64, len(data))
            struct.pack_into("<I", header, 28, arch)
            body += bytes(header) + data
        fatbin += struct.pack("<IHHQ", 0xBA55ED50, 1, 16, len(body)) + body
        fatbin += bytes(-len(fatbin) % 8)
    names = b"\0.shstrtab\0.nv_fatbin\0"
    data_off = 64
    names_off = data_off + len(fatbin)
    sh_off = names_off + len(names) + (-(names_off + len(names)) % 8)
    elf = bytearray(sh_off + 3 * 64)
    elf[:4] = b"\x7fELF"
    elf[4] = 2
    struct.pack_into("<Q", elf, 0x28, sh_off)
    struct.pack_into("<HHH", elf, 0x3A, 64, 3, 1)
    elf[data_off:data_off + len(fatbin)] = fatbin
    elf[names_off:names_off + len(names)] = names
    struct.pack_into("<I", elf, sh_off + 64, 1)  # .shstrtab
    struct.pack_into("<QQ", elf, sh_off + 64 + 0x18, names_off, len(names))
    struct.pack_into("<I", elf, sh_off + 128, 11)  # .nv_fatbin
    struct.pack_into("<QQ", elf, sh_off + 128 + 0x18, data_off, len(fatbin))
    return bytes(elf)


def test_prune_fatbin_zeroes_only_other_architectures(tmp_path) -> None:
    sm80, sm90, sm120 = b"\x80" * 24, b"\x90" * 40, b"\x12" * 16
    lib = tmp_path / "libx.so"
    lib.write_bytes(_elf_with_fatbin([[(80, sm80), (90, sm90), (120, sm120)], [(80, sm80)]]))
    zeroed, containers = payload.prune_fatbin(lib, 90)
    data = lib.read_bytes()
    assert containers == 2 and zeroed == len(sm80) + len(sm120)
    assert data.count(sm90) == 1 and data.count(sm80) == 1  # the container without sm_90 is left whole
    assert sm120 not in data
    assert payload.prune_fatbin(lib, 90)[1] == 2 and lib.read_bytes() == data  # pruning twice changes nothing
    odd = tmp_path / "odd.so"
    odd.write_bytes(b"not an ELF file")
    assert payload.prune_fatbin(odd, 90) == (0, 0)


@pytest.mark.skipif(shutil.which("cc") is None, reason="no C compiler")
def test_the_abi3_kernels_build_loads_in_a_fresh_package(tmp_path) -> None:
    package = tmp_path / "gmco_kernels"
    package.mkdir()
    src = ROOT / "libs" / "kernels" / "src" / "gmco_kernels"
    shutil.copy(src / "__init__.py", package / "__init__.py")
    include = subprocess.run([sys.executable, "-c", "import sysconfig; print(sysconfig.get_paths()['include'])"],
                             capture_output=True, text=True, check=True).stdout.strip()
    subprocess.run(["cc", "-O3", "-std=c11", "-shared", "-fPIC", "-fno-strict-aliasing", "-DPy_LIMITED_API=0x030B0000",
                    f"-I{include}", str(src / "kernels.c"), "-o", str(package / "_kernels.abi3.so"), "-lm"], check=True)
    code = (f"import numpy as np, gmco_kernels as g; assert g.__file__.startswith({str(tmp_path)!r}), g.__file__\n"
            "x = np.eye(4, 8, dtype=np.float16); s, r = g.scan(np.eye(2, 8, dtype=np.float32), x, 2)\n"
            "assert r[0, 0] == 0 and r[1, 0] == 1; print(g.SIMD)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False,
                          env={**os.environ, "PYTHONPATH": str(tmp_path)})
    assert proc.returncode == 0, proc.stderr


@pytest.mark.timeout(240)
def test_the_rehearsal_runs_every_step_of_the_session(tmp_path) -> None:
    env = {**os.environ, "GPU_SESSION_REHEARSAL_DIR": str(tmp_path), "GPU_SESSION_PYTHON": sys.executable}
    proc = subprocess.run(["bash", str(ROOT / "scripts" / "gpu-session.sh"), "rehearse"], env=env, capture_output=True,
                          text=True, timeout=220, check=False, cwd=ROOT)
    assert proc.returncode == 0 and "rehearsal passed" in proc.stdout, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert "payload: 3 of 3 parts here; all arrived whole" in proc.stdout
    assert "TOO LARGE" not in proc.stdout
