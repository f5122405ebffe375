"""Compile src/gmco_kernels/kernels.c into the package (``_kernels<EXT_SUFFIX>``) at build time.

The object is a Python extension module (importable, so installers keep it) whose functions are called
through ctypes. It is compiled for a generic x86-64 (or the build machine's architecture) and picks AVX2
or AVX-512 code paths at run time, so one build runs on any x86-64 CPU."""

from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
from pathlib import Path

from hatchling.builders.hooks.plugin.interface import BuildHookInterface


def compile_kernels(root: Path) -> Path:
    src = root / "src" / "gmco_kernels" / "kernels.c"
    out = src.with_name("_kernels" + sysconfig.get_config_var("EXT_SUFFIX"))
    if out.exists() and out.stat().st_mtime >= src.stat().st_mtime:
        return out
    cc = os.environ.get("CC", "cc")
    include = sysconfig.get_paths()["include"]
    cmd = [cc, "-O3", "-std=c11", "-shared", "-fPIC", "-fno-strict-aliasing", "-Wall", f"-I{include}",
           str(src), "-o", str(out), "-lm"]
    try:
        subprocess.run(cmd, check=True)
    except (OSError, subprocess.CalledProcessError) as exc:
        sys.exit(f"gmco-kernels: compiling {src.name} failed ({exc}); install a C compiler (Debian: gcc) and "
                 "the Python headers")
    return out


class CustomBuildHook(BuildHookInterface):
    def initialize(self, version: str, build_data: dict) -> None:
        compile_kernels(Path(self.root))
        build_data["pure_python"] = False
        build_data["infer_tag"] = True
