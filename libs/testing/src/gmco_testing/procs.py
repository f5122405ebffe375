"""Process helpers shared by the fixtures: free ports, waiting for readiness, clean teardown."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable
from types import TracebackType
from typing import Self

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

_HANDED_OUT: set[int] = set()


def free_port() -> int:
    """A TCP port that was free on 127.0.0.1 a moment ago, never the same one twice in a process.

    The kernel may hand a just-released port out again at once; a stack asks for a dozen ports before
    any of its services binds, so the ports already given out are skipped.
    """
    for _ in range(100):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port not in _HANDED_OUT:
            _HANDED_OUT.add(port)
            return port
    raise RuntimeError("no free TCP port on 127.0.0.1 after 100 tries")


def wait_until(predicate: Callable[[], bool], timeout: float, what: str, proc: subprocess.Popen | None = None,
               interval: float = 0.05) -> None:
    """Poll ``predicate`` until true; fail with ``what`` (and the process's exit) on timeout."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{what}: process exited with {proc.returncode} before it was ready")
        with contextlib.suppress(Exception):  # not ready yet
            if predicate():
                return
        time.sleep(interval)
    raise TimeoutError(f"{what}: not ready after {timeout:.0f}s")


def port_open(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket() as s:
        s.settimeout(0.2)
        return s.connect_ex((host, port)) == 0


def grpc_serving(target: str, service: str = "", timeout: float = 0.5,
                 credentials: grpc.ChannelCredentials | None = None) -> bool:
    """Whether ``target``'s standard health service says SERVING (over TLS with ``credentials``)."""
    channel = grpc.insecure_channel(target) if credentials is None else grpc.secure_channel(target, credentials)
    with channel as ch:
        try:
            resp = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout)
        except grpc.RpcError:
            return False
        return resp.status == health_pb2.HealthCheckResponse.SERVING


def wait_grpc_serving(target: str, timeout: float = 30.0, proc: subprocess.Popen | None = None,
                      service: str = "") -> None:
    wait_until(lambda: grpc_serving(target, service), timeout, f"gRPC health of {target}", proc)


def stop_process(proc: subprocess.Popen, timeout: float = 10.0, sig: int = signal.SIGTERM) -> int | None:
    """SIGTERM (or ``sig``), wait, then SIGKILL; returns the exit code."""
    if proc.poll() is None:
        try:
            proc.send_signal(sig)
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
    return proc.returncode


def kill9(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(5)


class ManagedServer:
    """``with Server(...) as server:``: ``start()`` on entry, ``cleanup()`` on exit and when the start fails."""

    def start(self) -> None:
        raise NotImplementedError

    def cleanup(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> Self:
        try:
            self.start()
        except BaseException:
            self.cleanup()
            raise
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.cleanup()


def pin_process(pid: int, cpus: set[int] | frozenset[int]) -> None:
    """Let every thread of the running process ``pid`` run only on ``cpus`` (threads it starts later
    inherit their parent thread's set). A thread that ends meanwhile is skipped."""
    for task in os.listdir(f"/proc/{pid}/task"):
        with contextlib.suppress(ProcessLookupError):
            os.sched_setaffinity(int(task), cpus)


def taskset(cpus: set[int] | frozenset[int] | None) -> list[str]:
    """The command prefix that runs a program, every thread of it, on ``cpus`` only (none when None)."""
    return [] if cpus is None else ["taskset", "-c", ",".join(map(str, sorted(cpus)))]
