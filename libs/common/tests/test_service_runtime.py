"""What every service's process gets from ``run_service``: numpy's BLAS capped to ``*_BLAS_THREADS`` threads,
no tracing interceptor while no tracer provider records spans, and gRPC's core settings from
``gmco_common.grpc_defaults`` before grpc loads. Each check runs in a fresh interpreter,
since both are process-wide."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest


def _run(code: str) -> str:
    done = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


@pytest.mark.parametrize("threads", [1, 2])
def test_numpy_blas_is_capped_and_faiss_is_left_alone(threads: int) -> None:
    out = _run(f"""
import faiss, numpy, threadpoolctl
from gmco_common.cli import limit_numpy_blas
before = {{lib["filepath"]: lib["num_threads"] for lib in threadpoolctl.threadpool_info()}}
capped = limit_numpy_blas({threads})
assert capped and all("numpy" in p for p in capped), capped
for lib in threadpoolctl.threadpool_info():
    print(lib["filepath"].split("/")[-2], lib["user_api"], before[lib["filepath"]], lib["num_threads"])
""")
    rows = [line.split() for line in out.splitlines()]
    assert [r[3] for r in rows if r[0] == "numpy.libs"] == [str(threads)]
    others = [r for r in rows if r[0] != "numpy.libs"]
    assert others and all(r[2] == r[3] for r in others), rows  # faiss's BLAS and OpenMP keep their threads


def test_no_tracing_interceptors_without_a_provider_and_both_with_one() -> None:
    out = _run("""
from gmco_common.tracing import client_interceptors, server_interceptor
print(server_interceptor() is None, client_interceptors() == [])
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
trace.set_tracer_provider(TracerProvider())
print(server_interceptor() is not None, len(client_interceptors()) > 0)
""")
    assert out.splitlines() == ["True True", "True True"]


def test_tune_gc_freezes_start_up_objects_and_raises_the_threshold() -> None:
    import gc

    from gmco_common.cli import tune_gc

    before = gc.get_threshold()
    try:
        tune_gc(0)
        assert gc.get_threshold() == before
        tune_gc(12_345)
        assert gc.get_threshold()[0] == 12_345
        assert gc.get_freeze_count() > 0
    finally:
        gc.unfreeze()
        gc.set_threshold(*before)


@pytest.mark.parametrize("kind", ["uvloop", "asyncio"])
def test_run_loop_runs_on_the_event_loop_named(kind: str) -> None:
    import asyncio

    from gmco_common.cli import run_loop

    seen = []

    async def main() -> None:
        seen.append(type(asyncio.get_running_loop()).__module__.split(".")[0])

    run_loop(main(), kind)
    assert seen == [kind]


@pytest.mark.parametrize("service", ["router", "shard", "cache", "rl_state", "ontology"])
def test_each_service_sets_grpc_experiments_before_grpc_loads(service: str) -> None:
    out = _run(f"""
import os, sys
os.environ.pop("GRPC_EXPERIMENTS", None)
import gmco_{service}.__main__
from gmco_common import grpc_defaults
print(grpc_defaults.APPLIED_BEFORE_GRPC, os.environ["GRPC_EXPERIMENTS"] == grpc_defaults.EXPERIMENTS)
""")
    assert out == "True True"


def test_grpc_knows_the_default_experiments_and_an_operators_own_value_wins() -> None:
    """An experiment gRPC no longer has is logged as 'Unknown experiment' at start: a grpcio upgrade that drops
    one fails here instead of in every service's log."""
    code = """
import asyncio, os
from gmco_common import grpc_defaults
import grpc
async def main():
    server = grpc.aio.server()
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        await channel.channel_ready()
    await server.stop(None)
asyncio.run(main())
print(os.environ["GRPC_EXPERIMENTS"])
"""
    env = {k: v for k, v in os.environ.items() if k != "GRPC_EXPERIMENTS"}
    done = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True, timeout=120,
                          env=env)
    assert done.returncode == 0, done.stderr
    assert "experiment" not in done.stderr.lower(), done.stderr
    assert done.stdout.strip() == "-event_engine_listener,-event_engine_client"
    own = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True, timeout=120,
                         env={**env, "GRPC_EXPERIMENTS": ""})
    assert own.returncode == 0 and own.stdout.strip() == "", own.stderr
