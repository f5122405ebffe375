"""CPU stand-in of CuPy 14 (see ../README.md): numpy arrays behind a wrapper that keeps host and device apart.

Only what the shard, its tests, the API probe and bench_gpu.py use is here; anything else numpy offers
under the same name is passed through with the same strictness (device arrays in, device arrays out).
"""

from __future__ import annotations

import itertools
import os
import sys
import threading
import time
import types

import numpy as _np

__version__ = "14.2.0+standin"
STANDIN = True

# -- bookkeeping the tests read -----------------------------------------------------------------------
standin = types.SimpleNamespace(events=[], allocator=None)


def _gpu_bytes() -> int:
    return int(os.environ.get("GMCO_STANDIN_GPU_BYTES", str(80 << 30)))


def _alloc_limit() -> int | None:
    limit = os.environ.get("GMCO_STANDIN_ALLOC_LIMIT")
    return int(limit) if limit else None


class ndarray:
    """A device array: a numpy array the host may not touch without ``get()``."""

    __slots__ = ("_a",)
    __array_priority__ = 100

    def __init__(self, a: _np.ndarray) -> None:
        self._a = a

    # host <-> device
    def __array__(self, *args, **kwargs):
        raise TypeError("Implicit conversion to a NumPy array is not allowed. Please use `.get()` to construct "
                        "a NumPy array explicitly.")

    def get(self, stream=None, order="C", out=None, blocking=True):
        standin.events.append(("get", None if stream is None else stream.ptr))
        return _np.array(self._a, order=order)

    @property
    def __cuda_array_interface__(self) -> dict:
        a = self._a
        return {"shape": a.shape, "typestr": a.dtype.str, "data": (a.ctypes.data, False), "version": 3,
                "strides": None if a.flags.c_contiguous else a.strides}

    @property
    def data(self):
        return types.SimpleNamespace(ptr=self._a.ctypes.data)

    # attributes and methods: numpy's, with device arrays in and out
    def __getattr__(self, name):
        if name.startswith("__"):  # no __array_interface__ / __array_struct__: numpy must not see the data
            raise AttributeError(name)
        attr = getattr(self._a, name)
        if callable(attr):
            def method(*args, **kwargs):
                return _wrap(attr(*_unwrap(args), **_unwrap(kwargs)))
            return method
        return _wrap(attr) if isinstance(attr, _np.ndarray) else attr

    def __getitem__(self, key):
        return _wrap(self._a[_unwrap(key)])

    def __setitem__(self, key, value) -> None:
        self._a[_unwrap(key)] = _unwrap(value)

    def __len__(self) -> int:
        return len(self._a)

    def __iter__(self):
        return (_wrap(row) for row in self._a)

    def __bool__(self) -> bool:
        return bool(self._a)

    def __int__(self) -> int:
        return int(self._a)

    def __float__(self) -> float:
        return float(self._a)

    def __index__(self) -> int:
        return int(self._a)

    def __repr__(self) -> str:
        return f"standin.cupy.{self._a!r}"

    def __neg__(self):
        return _wrap(-self._a)

    def __pos__(self):
        return self

    def __abs__(self):
        return _wrap(abs(self._a))

    def __invert__(self):
        return _wrap(~self._a)

    def __matmul__(self, other):
        return matmul(self, other)

    def __rmatmul__(self, other):
        return matmul(other, self)

    __hash__ = None


def _binary(name: str):
    def op(self, other):
        result = getattr(self._a, name)(_unwrap(other))
        return NotImplemented if result is NotImplemented else _wrap(result)
    op.__name__ = name
    return op


def _inplace(name: str):
    def op(self, other):
        getattr(self._a, name)(_unwrap(other))
        return self
    op.__name__ = name
    return op


for _name in ("add", "sub", "mul", "truediv", "floordiv", "mod", "pow", "and", "or", "xor", "lshift", "rshift"):
    setattr(ndarray, f"__{_name}__", _binary(f"__{_name}__"))
    setattr(ndarray, f"__r{_name}__", _binary(f"__r{_name}__"))
    setattr(ndarray, f"__i{_name}__", _inplace(f"__i{_name}__"))
for _name in ("lt", "le", "gt", "ge", "eq", "ne"):
    setattr(ndarray, f"__{_name}__", _binary(f"__{_name}__"))


def _unwrap(x):
    if isinstance(x, ndarray):
        return x._a
    if isinstance(x, _np.ndarray):
        raise TypeError(f"Unsupported type {type(x)} (a host numpy array where CuPy wants a device array)")
    if isinstance(x, tuple):
        return tuple(_unwrap(v) for v in x)
    if isinstance(x, list):
        return [_unwrap(v) for v in x]
    if isinstance(x, dict):
        return {k: _unwrap(v) for k, v in x.items()}
    return x


def _wrap(y):
    if isinstance(y, _np.ndarray):
        return ndarray(y)
    if isinstance(y, _np.generic):  # CuPy reductions give 0-d device arrays, not host scalars
        return ndarray(_np.asarray(y))
    if isinstance(y, tuple):
        return tuple(_wrap(v) for v in y)
    if isinstance(y, list):
        return [_wrap(v) for v in y]
    return y


def _allocated(a: _np.ndarray) -> ndarray:
    _reserve(a.nbytes)
    return ndarray(a)


def _reserve(nbytes: int) -> None:
    limit = _alloc_limit()
    if limit is not None and nbytes > limit:
        raise cuda.memory.OutOfMemoryError(nbytes, limit)


def _new(shape, dtype) -> None:
    """Refuse an allocation over the limit before numpy makes it."""
    _reserve(int(_np.prod(shape, dtype=_np.int64)) * _np.dtype(dtype).itemsize)


# -- creation and transfer ----------------------------------------------------------------------------
def asarray(a, dtype=None, order=None, *, blocking=False):
    if isinstance(a, ndarray):
        return a if dtype is None or a.dtype == _np.dtype(dtype) else a.astype(dtype)
    view = getattr(a, "_standin_array", None)
    if view is not None:  # a cuVS DeviceTensorView: __cuda_array_interface__, zero-copy
        return view
    return _allocated(_np.array(a, dtype=dtype, order=order or "K"))


def array(a, dtype=None, copy=True, order="K", ndmin=0, *, blocking=False):
    if isinstance(a, ndarray):
        return ndarray(_np.array(a._a, dtype=dtype, copy=copy, order=order, ndmin=ndmin))
    return _allocated(_np.array(a, dtype=dtype, order=order, ndmin=ndmin))


def asnumpy(a, stream=None, order="C", out=None, *, blocking=True):
    if isinstance(a, ndarray):
        standin.events.append(("asnumpy", None if stream is None else stream.ptr))
        host = _np.array(a._a, order=order)
        if out is not None:
            out[...] = host
            return out
        return host
    return _np.asarray(a, order=order)


def zeros(shape, dtype=float, order="C"):
    _new(shape, dtype)
    return ndarray(_np.zeros(shape, dtype, order))


def empty(shape, dtype=float, order="C"):
    """Poisoned, not zeroed: code that reads what it never wrote shows it."""
    _new(shape, dtype)
    return ndarray(_np.full(shape, _np.nan if _np.dtype(dtype).kind == "f" else 0xAB, dtype=dtype, order=order))


def full(shape, fill_value, dtype=None, order="C"):
    _new(shape, dtype if dtype is not None else _np.asarray(fill_value).dtype)
    return ndarray(_np.full(shape, fill_value, dtype, order))


def ones(shape, dtype=float, order="C"):
    _new(shape, dtype)
    return ndarray(_np.ones(shape, dtype, order))


# -- arithmetic CuPy does its own way -----------------------------------------------------------------
def matmul(a, b, out=None, **kwargs):
    """FP16 operands: FP32 accumulation, FP16 output (cuBLAS gemmEx under CuPy); else numpy's matmul."""
    x, y = _unwrap(a), _unwrap(b)
    if x.dtype == _np.float16 and y.dtype == _np.float16:
        result = (x.astype(_np.float32) @ y.astype(_np.float32)).astype(_np.float16)
    else:
        result = _np.matmul(x, y)
    if out is not None:
        out._a[...] = result
        return out
    return _wrap(result)


def argsort(a, axis=-1, kind=None):
    return _wrap(_np.argsort(_unwrap(a), axis=axis, kind="stable"))


def argpartition(a, kth, axis=-1):
    return argsort(a, axis)  # CuPy's argpartition sorts fully, too


def copyto(dst, src, casting="same_kind", where=True):
    _np.copyto(dst._a, _unwrap(src), casting=casting, where=_unwrap(where))


def __getattr__(name: str):
    attr = getattr(_np, name)
    if isinstance(attr, type) or not callable(attr):
        return attr  # dtypes (cupy.float16 is numpy.float16), constants

    def function(*args, **kwargs):
        return _wrap(attr(*_unwrap(args), **_unwrap(kwargs)))
    function.__name__ = name
    return function


# -- cupy.cuda --------------------------------------------------------------------------------------------
cuda = types.ModuleType("cupy.cuda")
sys.modules["cupy.cuda"] = cuda
_local = threading.local()
_ptrs = itertools.count(0x7F0000001000, 0x100)
_live_streams: set[int] = {0, 1, 2}


class Stream:
    """A CUDA stream: ``Stream.null`` is the legacy default stream (0), ``Stream.ptds`` the per-thread
    default stream (cudaStreamPerThread, 2), others get fresh handles."""

    null: Stream
    ptds: Stream

    def __init__(self, null: bool = False, non_blocking: bool = False, ptds: bool = False) -> None:
        self.ptr = 0 if null else 2 if ptds else next(_ptrs)
        self.non_blocking = non_blocking
        _live_streams.add(self.ptr)

    def __enter__(self):
        _local.__dict__.setdefault("stack", []).append(self)
        return self

    def __exit__(self, *exc) -> None:
        _local.stack.pop()

    def use(self):
        _local.__dict__.setdefault("stack", []).append(self)
        return self

    def synchronize(self) -> None:
        standin.events.append(("stream.synchronize", self.ptr))

    def record(self, event=None):
        event = event or Event()
        event.record(self)
        return event


Stream.null = Stream(null=True)
Stream.ptds = Stream(ptds=True)


def get_current_stream():
    stack = getattr(_local, "stack", None)
    return stack[-1] if stack else Stream.null


class Event:
    def __init__(self, block=False, disable_timing=False, interprocess=False) -> None:
        self.t = 0.0

    def record(self, stream=None) -> None:
        self.t = time.perf_counter()

    def synchronize(self) -> None:
        standin.events.append(("event.synchronize", None))


def get_elapsed_time(start: Event, end: Event) -> float:
    return (end.t - start.t) * 1e3


class Device:
    def __init__(self, device=None) -> None:
        self.id = 0 if device is None else int(device)
        self.pci_bus_id = "0000:41:00.0"
        self.compute_capability = "90"

    def synchronize(self) -> None:
        standin.events.append(("device.synchronize", None))
        runtime.deviceSynchronize()

    def use(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        pass


class _Runtime(types.ModuleType):
    CUDARuntimeError = RuntimeError

    @staticmethod
    def getDevice() -> int:
        return 0

    @staticmethod
    def getDeviceCount() -> int:
        return 1

    @staticmethod
    def memGetInfo() -> tuple[int, int]:
        total = _gpu_bytes()
        used = int(os.environ.get("GMCO_STANDIN_GPU_USED_BYTES", "0"))
        return total - used, total

    @staticmethod
    def deviceSynchronize() -> None:
        standin.events.append(("deviceSynchronize", None))

    @staticmethod
    def getDeviceProperties(device: int) -> dict:
        return {"name": b"CPU stand-in (numpy)", "totalGlobalMem": _gpu_bytes(), "multiProcessorCount": 132,
                "major": 9, "minor": 0, "l2CacheSize": 60 << 20}

    @staticmethod
    def runtimeGetVersion() -> int:
        return 13000

    @staticmethod
    def driverGetVersion() -> int:
        return 13000


runtime = _Runtime("cupy.cuda.runtime")
sys.modules["cupy.cuda.runtime"] = runtime


class OutOfMemoryError(MemoryError):
    def __init__(self, size: int, limit: int) -> None:
        super().__init__(f"Out of memory allocating {size:,} bytes (allocated so far: {limit:,} bytes).")


memory = types.ModuleType("cupy.cuda.memory")
memory.OutOfMemoryError = OutOfMemoryError
sys.modules["cupy.cuda.memory"] = memory


def set_allocator(allocator=None) -> None:
    standin.allocator = allocator


class _MemoryPool:
    def used_bytes(self) -> int:
        return 0

    def free_bytes(self) -> int:
        return 0

    def total_bytes(self) -> int:
        return 0

    def free_all_blocks(self, stream=None) -> None:
        pass

    def set_limit(self, size=None, fraction=None) -> None:
        pass


_pool = _MemoryPool()


def get_default_memory_pool() -> _MemoryPool:
    return _pool


for _attr in ("Stream", "Event", "Device", "get_current_stream", "get_elapsed_time", "set_allocator"):
    setattr(cuda, _attr, globals()[_attr])
cuda.runtime = runtime
cuda.memory = memory
cuda.standin_live_streams = _live_streams
cuda.__path__ = []  # a package, for `import cupy.cuda`
