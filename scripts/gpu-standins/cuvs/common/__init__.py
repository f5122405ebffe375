"""Stand-in of ``cuvs.common``: ``Resources`` keeps the 26.10 stream cast (NVIDIA/cuvs#1863)."""

from __future__ import annotations

from cuvs.common.exceptions import CuvsException

__all__ = ["CuvsException", "Resources", "auto_sync_resources"]

CUDA_STREAM_PER_THREAD = 2


class Resources:
    """``Resources(stream=None, memory_tracking_csv_path=None, memory_tracking_sample_interval_ms=10)``.

    26.10's ``__cinit__`` does ``cuvsStreamSet(self.c_obj, <cudaStream_t>stream)`` on the untyped Python
    object, which hands cuVS the object's address: ``c_stream`` records that. Without a stream cuVS keeps
    raft's default, ``cudaStreamPerThread``."""

    def __init__(self, stream=None, memory_tracking_csv_path=None, memory_tracking_sample_interval_ms=10) -> None:
        self.c_stream = id(stream) if stream else CUDA_STREAM_PER_THREAD
        self.syncs = 0

    def sync(self) -> None:
        self.syncs += 1

    def get_c_obj(self) -> int:
        return id(self)


def check_resources(resources) -> None:
    """What a cuVS call does with its resources' stream: a handle CUDA never made fails the call."""
    import cupy

    if resources is not None and resources.c_stream not in cupy.cuda.standin_live_streams:
        raise CuvsException(f"CUDA error encountered at: cudaErrorInvalidResourceHandle: invalid resource handle "
                            f"(stand-in: stream handle {resources.c_stream:#x} is the address of a Python object, "
                            "not a stream; NVIDIA/cuvs#1863)")


def auto_sync_resources(f):
    import functools

    @functools.wraps(f)
    def wrapper(*args, resources=None, **kwargs):
        sync = resources is None
        resources = resources if resources is not None else Resources()
        check_resources(resources)
        out = f(*args, resources=resources, **kwargs)
        if sync:
            resources.sync()
        return out
    return wrapper
