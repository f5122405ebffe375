"""Component tests boot a service exactly as production does: its ``start(settings, stack)`` on port 0,
driven through a real channel. Nothing here copies a service's wiring."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import grpc
from gmco_common.server import RunningServer

S = TypeVar("S")
StartFn = Callable[[Any, contextlib.AsyncExitStack], Awaitable[RunningServer]]


@dataclass
class Component:
    running: RunningServer
    channel: grpc.aio.Channel
    settings: Any

    @property
    def port(self) -> int:
        return self.running.port

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.running.port}"

    @property
    def parts(self) -> dict[str, Any]:
        return self.running.parts

    def stub(self, stub_class: type[S]) -> S:
        return stub_class(self.channel)  # type: ignore[call-arg]


@contextlib.asynccontextmanager
async def component(start: StartFn, settings: Any, channel_options: list[tuple[str, Any]] | None = None,
                    ) -> AsyncIterator[Component]:
    """``start(settings, stack)`` and a plain channel to it (no retries, so every error reaches the test);
    everything it opened is closed on exit."""
    async with contextlib.AsyncExitStack() as stack:
        running = await start(settings, stack)
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{running.port}", options=channel_options or [])
        stack.push_async_callback(channel.close)
        yield Component(running, channel, settings)
