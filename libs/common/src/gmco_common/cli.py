"""The one entry point every service's ``__main__`` uses: ``--help`` lists the environment, settings
are loaded (a bad one exits 2 naming the variable), logging is configured, and the server runs until
SIGTERM."""

from __future__ import annotations

import asyncio
import logging
import sys
from collections.abc import Awaitable, Callable, Sequence
from typing import TypeVar

from gmco_common.config import ConfigError, describe_settings, load_settings
from gmco_common.logging import configure_logging

S = TypeVar("S")
log = logging.getLogger(__name__)


def run_service(name: str, description: str, settings_cls: type[S], prefix: str,
                serve: Callable[[S], Awaitable[None]], argv: Sequence[str] | None = None,
                startup_errors: tuple[type[Exception], ...] = (ConfigError, RuntimeError)) -> int:
    """Run ``serve(settings)``; returns the process exit code (0 ok, 1 failed to start, 2 bad usage/setting)."""
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
    configure_logging(name.replace("-", "_"), settings.log_level, settings.log_format)  # type: ignore[attr-defined]
    try:
        asyncio.run(serve(settings))
    except startup_errors as exc:
        log.error("cannot start: %s", exc)
        print(f"gmco-{name}: cannot start: {exc}", file=sys.stderr)
        return 1
    return 0
