"""Stand-in of ``rmm.allocators.cupy``: the allocator CuPy is pointed at (never called by the stand-in)."""

from __future__ import annotations


def rmm_cupy_allocator(nbytes: int):
    raise RuntimeError("the CuPy stand-in allocates with numpy; rmm_cupy_allocator is never called")
