"""CPU stand-in of rmm 26.10 (see ../README.md): ``reinitialize`` checks what the real pool would refuse."""

from __future__ import annotations

import types

__version__ = "26.10.0+standin"
STANDIN = True
state = types.SimpleNamespace(calls=[], initialized=False)


class RMMError(RuntimeError):
    pass


def reinitialize(pool_allocator: bool = False, managed_memory: bool = False,
                 initial_pool_size: int | str | None = None, maximum_pool_size: int | str | None = None,
                 devices: int | list[int] = 0, logging: bool = False, log_file_name: str | None = None) -> None:
    import cupy

    free, _ = cupy.cuda.runtime.memGetInfo()
    for size in (initial_pool_size, maximum_pool_size):
        if isinstance(size, int):
            if size % 256:
                raise ValueError(f"pool size {size} is not a multiple of 256 bytes")
            if size > free:
                raise MemoryError(f"std::bad_alloc: out_of_memory: RMM failure: pool of {size} bytes, "
                                  f"{free} bytes free on the device: Maximum pool size exceeded")
    state.calls.append({"pool_allocator": pool_allocator, "initial_pool_size": initial_pool_size,
                        "maximum_pool_size": maximum_pool_size, "devices": devices})
    state.initialized = True


def is_initialized() -> bool:
    return state.initialized
