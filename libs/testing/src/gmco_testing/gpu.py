"""Whether ``gpu`` tests can run here.

They are skipped, with the reason shown, only where there is no NVIDIA GPU at all. On a machine with a GPU
they run: a cuVS or CuPy that fails to load then fails the tests with the real import error, instead of
hiding behind a skip (an ``import cuvs`` that succeeds says nothing about ``libcuvs.so`` loading).
"""

from __future__ import annotations

import shutil
import subprocess


def gpu_skip_reason() -> str | None:
    if shutil.which("nvidia-smi") is None:
        return "no NVIDIA GPU on this machine (nvidia-smi not found)"
    try:
        subprocess.run(["nvidia-smi", "-L"], check=True, capture_output=True, timeout=10)
    except (subprocess.SubprocessError, OSError) as exc:
        return f"nvidia-smi failed: {exc}"
    return None
