"""The one entry point every service's ``__main__`` uses: ``--help`` lists the environment, settings
are loaded (a bad one exits 2 naming the variable), logging is configured, the service is started with
its ``start(settings, stack)`` and runs until SIGTERM, then drains and closes what ``start`` opened."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import sys
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from typing import Any, TypeVar

from gmco_common.config import ConfigError, ServerSettings, describe_settings, load_settings
from gmco_common.logging import configure_logging
from gmco_common.server import RunningServer, serve_until_signal
from gmco_common.tracing import configure_tracing

S = TypeVar("S", bound=ServerSettings)
StartFn = Callable[[S, contextlib.AsyncExitStack], Awaitable[RunningServer]]
log = logging.getLogger(__name__)


async def serve(settings: S, start: StartFn[S]) -> None:
    """Start the service on an exit stack, serve until SIGTERM/SIGINT, drain, then close in reverse order."""
    async with contextlib.AsyncExitStack() as stack:
        running = await start(settings, stack)
        tune_gc(settings.gc_threshold)
        await serve_until_signal(running, settings.grace_seconds)


def tune_gc(threshold: int) -> None:
    """Freeze what start-up made (indexes, tables, settings, modules) out of the cyclic collector and make
    young collections rarer: a service's requests make few reference cycles, and a full collection that
    walks every start-up object stalls every request in flight."""
    if threshold <= 0:
        return
    gc.collect()
    gc.freeze()
    gc.set_threshold(threshold, 20, 20)


def limit_numpy_blas(threads: int) -> list[str]:
    """Cap the threads of numpy's own BLAS (not faiss's, whose index builds want every core); returns the
    libraries capped. A service multiplies small matrices for many requests at once: OpenBLAS splitting
    each one across threads made a 100 x 1024 by 1024 x 32 product take 2.9 ms instead of 0.4 ms on a
    loaded 2-core machine, waiting for threads that were not running."""
    import numpy  # noqa: F401 - its BLAS must be loaded to be found
    from threadpoolctl import ThreadpoolController

    capped = []
    for lib in ThreadpoolController().lib_controllers:
        if lib.user_api == "blas" and "numpy" in lib.filepath:
            lib.set_num_threads(threads)
            capped.append(lib.filepath)
    return capped


def run_loop(main: Coroutine[Any, Any, None], event_loop: str) -> None:
    """Run ``main`` to completion on a new event loop of the kind named (``uvloop`` or ``asyncio``)."""
    if event_loop == "uvloop":
        import uvloop

        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            runner.run(main)
    else:
        asyncio.run(main)


def run_service(name: str, description: str, settings_cls: type[S], prefix: str, start: StartFn[S],
                argv: Sequence[str] | None = None,
                startup_errors: tuple[type[Exception], ...] = (ConfigError, RuntimeError)) -> int:
    """Run the service; returns the process exit code (0 ok, 1 failed to start, 2 bad usage/setting)."""
    args = list(sys.argv[1:] if argv is None else argv)
    usage = (f"usage: gmco-{name}\n\n{description.strip()}\n\nConfigured by environment variables:\n\n"
             f"{describe_settings(settings_cls, prefix)}\n")
    if args:
        wants_help = args[0] in ("-h", "--help")
        print(usage, file=sys.stdout if wants_help else sys.stderr)
        return 0 if wants_help else 2
    try:
        settings = load_settings(settings_cls, prefix)
    except ConfigError as exc:
        print(f"gmco-{name}: {exc}", file=sys.stderr)
        return 2
    configure_logging(name.replace("-", "_"), settings.log_level, settings.log_format)
    limit_numpy_blas(settings.blas_threads)
    try:
        configure_tracing(settings, f"gmco-{name}")  # before start() opens its channels, which trace only then
        run_loop(serve(settings, start), settings.event_loop)
    except startup_errors as exc:
        log.error("cannot start: %s", exc)
        print(f"gmco-{name}: cannot start: {exc}", file=sys.stderr)
        return 1
    return 0
