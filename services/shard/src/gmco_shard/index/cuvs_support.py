"""What the GPU backends decide without a GPU, so that it is unit-tested on CPU machines: whether a load
fits the memory pool, the allow-bitmap to cuVS bitset packing, the recognition of out-of-memory errors
from rmm, CuPy and cuVS, and what to say when cuVS is installed but its libraries cannot load. (The CAGRA
parameters themselves are ``index.params.CagraParams``.)
"""

from __future__ import annotations

import ctypes
import importlib.util
from pathlib import Path

import numpy as np
from gmco_common.errors import ResourceExhausted

ENV = "GMCO_SHARD_"


def check_fits(need: int, pool: int, rows: int) -> None:
    """Refuse a load that cannot fit in the pool, before touching the device."""
    if need > pool:
        raise ResourceExhausted(
            f"{rows} rows need at least {need / 2**30:.2f} GiB of GPU memory but the pool has {pool / 2**30:.2f} GiB; "
            f"raise {ENV}GPU_POOL_BYTES / {ENV}GPU_POOL_FRACTION, use a larger GPU, or spread the slots over more "
            "shards")


def bitset(allow: np.ndarray, n: int) -> np.ndarray:
    """The cuVS bitset of a row bitmap (``gmco_shard.bitmaps`` uint64 words) over ``n`` rows: uint32 words, bit
    ``i % 32`` of word ``i // 32`` set = row i allowed. The same bytes, so a view, cut to ceil(n / 32) words."""
    return np.ascontiguousarray(allow).view("<u4")[: (n + 31) // 32]


_OOM_MARKERS = ("out_of_memory", "out of memory", "bad_alloc", "cudaerrormemoryallocation", "maximum pool size exceeded")


def is_out_of_memory(exc: BaseException) -> bool:
    """True for device allocation failures: rmm/CuPy raise MemoryError, cuVS a CuvsException whose text names
    the failed allocation (``std::bad_alloc``, ``rmm::out_of_memory``, ``cudaErrorMemoryAllocation``)."""
    if isinstance(exc, MemoryError):
        return True
    text = str(exc).lower()
    return any(marker in text for marker in _OOM_MARKERS)


# Top-level packages of the gpu extra: an ImportError naming one of these (and no shared library) means
# the package is not installed.
GPU_PACKAGES = ("cupy", "cuvs", "rmm", "pylibraft", "libcuvs", "libraft", "librmm", "libkvikio", "rapids_logger",
                "cuda")
_LOAD_MARKERS = (".so", "undefined symbol", "cannot open shared object", "version `", "DynamicLibNotFoundError")


def is_load_error(exc: ImportError) -> bool:
    """True when a package is there but a shared library under it failed to load (a dlopen error)."""
    text = str(exc)
    return exc.path is not None and exc.path.endswith(".so") or any(m in text for m in _LOAD_MARKERS)


def explain_load_error(text: str, diagnosis: str | None = None) -> str:
    """The loader's message, with what to do about the causes seen with the RAPIDS 26.10 wheels."""
    parts = [text]
    if diagnosis and diagnosis not in text:
        parts.append(f"libcuvs.so itself: {diagnosis}")
    both = " ".join(parts)
    if "nvJitLink" in both:
        parts.append("libcuvs/libraft 26.10 need libnvJitLink >= 13.3 (__nvJitLink*_13_3): install "
                     "nvidia-nvjitlink>=13.3 and put its nvidia/cu13/lib first on LD_LIBRARY_PATH (or LD_PRELOAD "
                     "its libnvJitLink.so.13) before anything loads an older one (docs/gpu.md)")
    elif "DynamicLibNotFoundError" in both or "Failure finding" in both:
        parts.append("cuda.pathfinder (which the RAPIDS wheels load CUDA libraries with) found no such library: "
                     "install the nvidia-* wheel that holds it, or put its folder (site-packages/nvidia/cu13/lib) on "
                     "LD_LIBRARY_PATH (docs/gpu.md)")
    elif "cannot open shared object" in both:
        parts.append("a CUDA library is not on the loader's path: export LD_LIBRARY_PATH with "
                     "site-packages/nvidia/cu13/lib and nvidia/nccl/lib (libcuvs's RPATH points next to the "
                     "wheel, which is empty after pip install --target; docs/gpu.md)")
    return "; ".join(parts)


def diagnose_libcuvs() -> str | None:
    """Load ``libcuvs.so`` from its wheel directly, for the error its own loader swallows (None: it loads,
    or there is no such wheel here)."""
    spec = importlib.util.find_spec("libcuvs")
    if spec is None or not spec.submodule_search_locations:
        return None
    lib = Path(next(iter(spec.submodule_search_locations))) / "lib64" / "libcuvs.so"
    if not lib.is_file():
        return None
    try:
        ctypes.CDLL(str(lib), ctypes.RTLD_LOCAL)
    except OSError as exc:
        return str(exc)
    return None


def load_error(exc: ImportError) -> ImportError:
    """``exc`` as the registry should see it: unchanged for a missing package (its name tells what to
    install), else an ImportError without a name whose text is the loader's error and what to do."""
    if not is_load_error(exc) and (exc.name or "").split(".")[0] in GPU_PACKAGES:
        return exc
    try:
        diagnosis = diagnose_libcuvs()
    except Exception as why:  # noqa: BLE001 - a diagnosis must not hide the error it explains
        diagnosis = f"(diagnosis failed: {why})"
    return ImportError(explain_load_error(str(exc), diagnosis))
