"""The GPU session's payload: wheels unpacked here into one xz-compressed tree, cut into parts small enough
for the device tool's transfers, and installed there only where the device lacks a new enough version.

Standard library only (it runs under the device image's python3 too).

    here:  python3 scripts/gpu_session/payload.py pack --out .gpu-wheels/session WHEEL...
    there: python3 scripts/gpu_session/payload.py install --session .gpu-wheels/session --target /tmp/gpu-site

``pack`` unpacks each wheel into ``<dist>==<version>/`` (a wheel is a zip of its installed files), leaves
out what nothing loads at run time (C++ headers, CMake files, static libraries, Cython sources), tars the
lot, compresses it with xz (``-9e``) and cuts the stream into parts ``NN/payload.NN`` of at most
``--part-mib``, each with the manifest (versions, the install floors, every piece's sha256). ``--prune-sm``
zeroes the GPU code of every other architecture in the libraries' fatbins (the CUDA runtime reads only
the entries of the device's architecture), which makes libcuvs.so compress to a fraction: for a session
on one known GPU when the transfers are short of room.

``install`` checks that every part arrived whole, unpacks the tree, and copies a distribution into the
target only when the running interpreter has none of it, or a version below its floor: by default the
carried version itself, lower where the manifest says a lower one is enough (so that a newer package of
the image is never shadowed by an older carried one, and an older one is, e.g. nvJitLink 13.0 by 13.5).
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.metadata
import io
import json
import lzma
import re
import shutil
import struct
import sys
import tarfile
import zipfile
from pathlib import Path

MANIFEST = "MANIFEST.json"
# Left out of the tree: nothing imports or loads them at run time.
_PRUNE = re.compile(r"(^|/)(include|cmake|__pycache__)/|\.(a|pyx|pxd|h|hpp|cuh)$|(^|/)share/")
# A lower floor than the carried version, where the project needs less (the image's own is then kept).
FLOORS = {
    "cuda-bindings": "13.0.1",  # rmm/cuvs/pylibraft 26.10: cuda-bindings>=13.0.1,<14
    "cuda-pathfinder": "1.0",
    "nvidia-nvjitlink": "13.3",  # libcuvs/libraft 26.10 import __nvJitLink*_13_3
    "grpcio": "1.85.1",  # the generated stubs' GRPC_GENERATED_VERSION
    "protobuf": "7.35.1",  # the generated code's runtime version check
    "nvidia-ml-py": "12.560",  # the gpu extra's floor; the image has its own
    "packaging": "20",
    "typing-extensions": "4.10",
    "prometheus-client": "0.20",
    "tqdm": "4.66",
    "xxhash": "3.4",
}
_WHEEL = re.compile(r"^(?P<name>[^-]+)-(?P<version>[^-]+)(-\d[^-]*)?-[^-]+-[^-]+-[^-]+\.whl$")


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def wheel_dist(path: Path) -> tuple[str, str]:
    match = _WHEEL.match(path.name)
    if match is None:
        raise SystemExit(f"payload: {path.name} is not a wheel file name")
    return canonical(match["name"]), match["version"]


# -- versions ---------------------------------------------------------------------------------------
def version_key(version: str) -> tuple:
    """A sort key for release versions (``13.0.88``, ``26.10.0``, ``0.66b2``, ``2.11.0+cu130``): numeric parts
    compare as numbers, a pre-release sorts before its release, a local ``+...`` part is ignored."""
    release = version.split("+", 1)[0]
    match = re.match(r"^(\d+(?:\.\d+)*)(?:[.-]?(a|b|rc|dev)(\d*))?", release)
    if match is None:
        return ((0,), 0)
    nums = tuple(int(p) for p in match[1].split("."))
    while len(nums) > 1 and nums[-1] == 0:
        nums = nums[:-1]
    pre = {"dev": -4, "a": -3, "b": -2, "rc": -1}.get(match[2] or "", 0)
    return (nums, pre, int(match[3] or 0))


def needs_install(installed: str | None, carried: str, floor: str | None = None) -> bool:
    """Install the carried distribution when the device has none, or one below ``floor`` (default: the
    carried version). A device version at or above it is kept."""
    if installed is None:
        return True
    return version_key(installed) < version_key(floor or carried)


def installed_version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


# -- fatbin pruning ---------------------------------------------------------------------------------
_FATBIN_MAGIC = 0xBA55ED50


def _section(data: bytes | bytearray, name: bytes) -> tuple[int, int] | None:
    """(file offset, size) of an ELF64 section by name."""
    if data[:4] != b"\x7fELF" or data[4] != 2:
        return None
    shoff, = struct.unpack_from("<Q", data, 0x28)
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", data, 0x3A)
    str_off, = struct.unpack_from("<Q", data, shoff + shstrndx * shentsize + 0x18)
    for i in range(shnum):
        base = shoff + i * shentsize
        name_off, = struct.unpack_from("<I", data, base)
        end = data.index(b"\0", str_off + name_off)
        if data[str_off + name_off:end] == name:
            offset, size = struct.unpack_from("<QQ", data, base + 0x18)
            return offset, size
    return None


def prune_fatbin(path: Path, keep_sm: int) -> tuple[int, int]:
    """Zero the payload of every fatbin entry whose architecture is not ``keep_sm``, in place, in each
    container that has an entry for it (a container without one is left whole). Returns (bytes zeroed,
    containers seen); the file is left untouched unless every container parses."""
    data = bytearray(path.read_bytes())
    where = _section(data, b".nv_fatbin")
    if where is None:
        return 0, 0
    pos, end = where[0], where[0] + where[1]
    plans: list[list[tuple[int, int]]] = []
    while pos < end:
        magic, _version, header, size = struct.unpack_from("<IHHQ", data, pos)
        if magic != _FATBIN_MAGIC:  # containers are 8-byte aligned; skip padding
            pos += 8
            continue
        entry, stop = pos + header, pos + header + size
        zero, has_keep = [], False
        while entry < stop:
            _kind, _unknown, entry_header, payload = struct.unpack_from("<HHIQ", data, entry)
            arch, = struct.unpack_from("<I", data, entry + 28)
            if entry_header < 32 or entry + entry_header + payload > stop:
                return 0, len(plans)  # not the layout this was written for: change nothing
            if arch == keep_sm:
                has_keep = True
            else:
                zero.append((entry + entry_header, payload))
            entry += entry_header + payload
        plans.append(zero if has_keep else [])
        pos = stop
    zeroed = 0
    for zero in plans:
        for start, length in zero:
            data[start:start + length] = bytes(length)
            zeroed += length
    if zeroed:
        path.write_bytes(bytes(data))
    return zeroed, len(plans)


# -- pack -----------------------------------------------------------------------------------------
def unpack_wheel(wheel: Path, into: Path) -> Path:
    dist, version = wheel_dist(wheel)
    dest = into / f"{dist}=={version}"
    with zipfile.ZipFile(wheel) as zf:
        for info in zf.infolist():
            if info.is_dir() or _PRUNE.search(info.filename):
                continue
            target = dest / info.filename
            target.parent.mkdir(parents=True, exist_ok=True)
            with zf.open(info) as src, open(target, "wb") as out:
                shutil.copyfileobj(src, out, 1 << 20)
            if (info.external_attr >> 16) & 0o111:
                target.chmod(0o755)
    return dest


class _Pieces(io.RawIOBase):
    """A write-only stream cut into files of at most ``size`` bytes, hashed as they are written."""

    def __init__(self, out: Path, size: int) -> None:
        self.out, self.size = out, size
        self.pieces: list[dict] = []
        self._file = None
        self._hash = None
        self._left = 0

    def writable(self) -> bool:
        return True

    def _roll(self) -> None:
        self._close_piece()
        i = len(self.pieces) + 1
        (self.out / f"{i:02d}").mkdir(parents=True)
        name = f"{i:02d}/payload.{i:02d}"
        self._file = open(self.out / name, "wb")  # noqa: SIM115 - closed in _close_piece
        self._hash = hashlib.sha256()
        self._left = self.size
        self.pieces.append({"name": name, "bytes": 0, "sha256": ""})

    def _close_piece(self) -> None:
        if self._file is not None:
            self._file.close()
            self.pieces[-1]["sha256"] = self._hash.hexdigest()
            self._file = None

    def write(self, b) -> int:
        view = memoryview(b)
        done = 0
        while done < len(view):
            if self._file is None or self._left == 0:
                self._roll()
            n = min(self._left, len(view) - done)
            chunk = view[done:done + n]
            self._file.write(chunk)
            self._hash.update(chunk)
            self.pieces[-1]["bytes"] += n
            self._left -= n
            done += n
        return done

    def close(self) -> None:
        self._close_piece()
        super().close()


class _Joined(io.RawIOBase):
    """The pieces read back as one stream."""

    def __init__(self, paths: list[Path]) -> None:
        self._paths = list(paths)
        self._file = None

    def readable(self) -> bool:
        return True

    def readinto(self, buf) -> int:
        while True:
            if self._file is None:
                if not self._paths:
                    return 0
                self._file = open(self._paths.pop(0), "rb")  # noqa: SIM115 - closed at its end
            n = self._file.readinto(buf)
            if n:
                return n
            self._file.close()
            self._file = None


def pack(wheels: list[Path], out: Path, part_mib: float, max_parts: int, prune_sm: int | None = None,
         preset: int = 9 | lzma.PRESET_EXTREME, stage: Path | None = None) -> dict:
    stage = stage or out.parent / (out.name + ".stage")
    shutil.rmtree(stage, ignore_errors=True)
    shutil.rmtree(out, ignore_errors=True)
    stage.mkdir(parents=True)
    out.mkdir(parents=True)
    dists: dict[str, dict] = {}
    for wheel in sorted(wheels):
        dist, version = wheel_dist(wheel)
        if dist in dists:
            if dists[dist]["version"] != version:
                raise SystemExit(f"payload: two versions of {dist} ({dists[dist]['version']}, {version}): keep one")
            continue
        dest = unpack_wheel(wheel, stage)
        dists[dist] = {"version": version, "floor": FLOORS.get(dist, version), "dir": dest.name}
    pruned = 0
    if prune_sm:
        for lib in sorted(stage.rglob("*.so*")):
            if lib.is_file() and not lib.is_symlink():
                pruned += prune_fatbin(lib, prune_sm)[0]
    tree_bytes = sum(f.stat().st_size for f in stage.rglob("*") if f.is_file())
    pieces = _Pieces(out, int(part_mib * (1 << 20)))
    with lzma.open(pieces, "wb", preset=preset) as xz, tarfile.open(fileobj=xz, mode="w|") as tar:
        for path in sorted(stage.iterdir()):
            tar.add(path, arcname=path.name)
    pieces.close()
    shutil.rmtree(stage, ignore_errors=True)
    packed = sum(p["bytes"] for p in pieces.pieces)
    if len(pieces.pieces) > max_parts:
        shutil.rmtree(out, ignore_errors=True)
        raise SystemExit(f"payload: {packed / 2**20:.1f} MiB needs {len(pieces.pieces)} parts of {part_mib} MiB, "
                         f"more than {max_parts}; carry fewer wheels, or pack with --prune-sm for one known GPU")
    manifest = {"dists": dists, "pieces": pieces.pieces, "bytes": packed, "tree_bytes": tree_bytes,
                "pruned_sm": prune_sm, "pruned_bytes": pruned}
    for piece in pieces.pieces:
        (out / piece["name"]).parent.joinpath(MANIFEST).write_text(json.dumps(manifest, indent=1))
    return manifest


def resplit(session: Path, part_mib: float, max_parts: int) -> dict:
    """Cut a packed payload into parts of another size, without compressing it again."""
    manifest, bad = check_parts(session)
    if bad:
        raise SystemExit(f"payload: parts missing or damaged: {', '.join(bad)}")
    old = [session / p["name"] for p in manifest["pieces"]]
    fresh = session.parent / (session.name + ".resplit")
    shutil.rmtree(fresh, ignore_errors=True)
    fresh.mkdir(parents=True)
    pieces = _Pieces(fresh, int(part_mib * (1 << 20)))
    with io.BufferedReader(_Joined(old), 1 << 20) as src:
        while chunk := src.read(1 << 20):
            pieces.write(chunk)
    pieces.close()
    if len(pieces.pieces) > max_parts:
        shutil.rmtree(fresh, ignore_errors=True)
        raise SystemExit(f"payload: {len(pieces.pieces)} parts of {part_mib} MiB, more than {max_parts}")
    manifest = {**manifest, "pieces": pieces.pieces}
    for piece in pieces.pieces:
        (fresh / piece["name"]).parent.joinpath(MANIFEST).write_text(json.dumps(manifest, indent=1))
    for entry in session.iterdir():
        if re.fullmatch(r"\d\d", entry.name):
            shutil.rmtree(entry)
    for entry in fresh.iterdir():
        entry.rename(session / entry.name)
    fresh.rmdir()
    return manifest


# -- install --------------------------------------------------------------------------------------
def read_manifest(session: Path) -> dict:
    found = sorted(session.glob(f"*/{MANIFEST}"))
    if not found:
        raise SystemExit(f"payload: no part has arrived in {session} (no */{MANIFEST})")
    return json.loads(found[0].read_text())


def check_parts(session: Path) -> tuple[dict, list[str]]:
    """The manifest and the pieces missing or damaged (empty: all arrived whole)."""
    manifest = read_manifest(session)
    bad = []
    for piece in manifest["pieces"]:
        path = session / piece["name"]
        if not path.is_file():
            bad.append(f"{piece['name']} (missing)")
        elif hashlib.sha256(path.read_bytes()).hexdigest() != piece["sha256"]:
            bad.append(f"{piece['name']} (damaged)")
    return manifest, bad


def install(session: Path, target: Path, stage: Path) -> dict:
    manifest, bad = check_parts(session)
    if bad:
        raise SystemExit(f"payload: parts missing or damaged: {', '.join(bad)}; carry them again")
    shutil.rmtree(stage, ignore_errors=True)
    stage.mkdir(parents=True)
    joined = io.BufferedReader(_Joined([session / p["name"] for p in manifest["pieces"]]), 1 << 20)
    with lzma.open(joined, "rb") as xz, tarfile.open(fileobj=xz, mode="r|") as tar:
        if hasattr(tarfile, "tar_filter"):
            tar.extractall(stage, filter="tar")
        else:
            tar.extractall(stage)
    target.mkdir(parents=True, exist_ok=True)
    report = {"target": str(target), "installed": {}, "kept": {}}
    for dist, info in sorted(manifest["dists"].items()):
        have = installed_version(dist)
        if needs_install(have, info["version"], info["floor"]):
            shutil.copytree(stage / info["dir"], target, dirs_exist_ok=True, symlinks=True)
            report["installed"][dist] = {"version": info["version"], "device_had": have}
        else:
            report["kept"][dist] = {"device_has": have, "carried": info["version"], "floor": info["floor"]}
    shutil.rmtree(stage, ignore_errors=True)
    return report


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("pack")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--part-mib", type=float, default=56.0)
    p.add_argument("--max-parts", type=int, default=4)
    p.add_argument("--prune-sm", type=int, default=None)
    p.add_argument("--fast", action="store_true", help="xz -1 (for rehearsals)")
    p.add_argument("wheels", type=Path, nargs="+")
    r = sub.add_parser("resplit")
    r.add_argument("--session", type=Path, required=True)
    r.add_argument("--part-mib", type=float, required=True)
    r.add_argument("--max-parts", type=int, default=4)
    c = sub.add_parser("check")
    c.add_argument("--session", type=Path, required=True)
    i = sub.add_parser("install")
    i.add_argument("--session", type=Path, required=True)
    i.add_argument("--target", type=Path, required=True)
    i.add_argument("--stage", type=Path, default=Path("/tmp/gpu-stage"))
    i.add_argument("--report", type=Path)
    a = ap.parse_args(argv)
    if a.cmd == "pack":
        m = pack(a.wheels, a.out, a.part_mib, a.max_parts, a.prune_sm, preset=1 if a.fast else 9 | lzma.PRESET_EXTREME)
        sizes = ", ".join(f"{p['bytes'] / 2**20:.1f}" for p in m["pieces"])
        print(f"payload: {len(m['dists'])} distributions, {m['tree_bytes'] / 2**20:.0f} MiB unpacked, "
              f"{m['bytes'] / 2**20:.1f} MiB packed in {len(m['pieces'])} parts ({sizes} MiB) under {a.out}")
        return 0
    if a.cmd == "resplit":
        m = resplit(a.session, a.part_mib, a.max_parts)
        sizes = ", ".join(f"{p['bytes'] / 2**20:.1f}" for p in m["pieces"])
        print(f"payload: {len(m['pieces'])} parts ({sizes} MiB)")
        return 0
    if a.cmd == "check":
        manifest, bad = check_parts(a.session)
        have = len(manifest["pieces"]) - len(bad)
        print(f"payload: {have} of {len(manifest['pieces'])} parts here" + (f"; not yet: {', '.join(bad)}" if bad else
                                                                           "; all arrived whole"))
        return 0
    report = install(a.session, a.target, a.stage)
    text = json.dumps(report, indent=1)
    if a.report:
        a.report.write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
