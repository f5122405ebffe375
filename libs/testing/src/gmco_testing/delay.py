"""A TCP proxy on loopback that delays what a server sends back: a slow dependency, made on demand.

:class:`DelayProxy` listens on a free port and forwards every connection to ``upstream``. Bytes from the
client go through at once; bytes from the server are held for ``delay`` seconds (each chunk from when it
arrived, order kept), so every answer (gRPC replies, health checks, HTTP/2 pings) arrives that much
later while throughput stays the server's own. ``delay`` can change while connections are open. It runs
its own event loop in a daemon thread, so synchronous tests and fixtures can use it::

    with DelayProxy("127.0.0.1:50054") as proxy:   # clients connect to proxy.target
        proxy.delay = 0.2
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from types import TracebackType
from typing import Self

from gmco_testing.procs import free_port


class DelayProxy:
    def __init__(self, upstream: str | None = None, delay: float = 0.0) -> None:
        self.upstream = upstream  # host:port; may be set after construction, before the first connection
        self.delay = delay
        self.port = free_port()
        self.connections = 0
        self._loop = asyncio.new_event_loop()
        self._server: asyncio.base_events.Server | None = None
        self._thread = threading.Thread(target=self._loop.run_forever, name=f"delay-proxy-{self.port}",
                                        daemon=True)

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> Self:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._listen(), self._loop).result(10)
        return self

    def stop(self) -> None:
        if self._thread.is_alive():
            asyncio.run_coroutine_threadsafe(self._close(), self._loop).result(10)
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

    async def _listen(self) -> None:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", self.port)

    async def _close(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in asyncio.all_tasks(self._loop):
            if task is not asyncio.current_task():
                task.cancel()

    async def _serve(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        if self.upstream is None:
            client_w.close()
            return
        host, _, port = self.upstream.rpartition(":")
        try:
            server_r, server_w = await asyncio.open_connection(host, int(port))
        except OSError:
            client_w.close()
            return
        self.connections += 1
        up = asyncio.ensure_future(self._pump(client_r, server_w, delayed=False))
        down = asyncio.ensure_future(self._pump(server_r, client_w, delayed=True))
        try:
            await asyncio.wait({up, down}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (up, down):
                task.cancel()
            for writer in (client_w, server_w):
                writer.close()

    async def _pump(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, delayed: bool) -> None:
        queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()

        async def send() -> None:
            while True:
                due, chunk = await queue.get()
                wait = due - time.monotonic()
                if wait > 0:
                    await asyncio.sleep(wait)
                if not chunk:
                    return
                writer.write(chunk)
                await writer.drain()

        sender = asyncio.ensure_future(send())
        try:
            while True:
                chunk = await reader.read(65536)
                await queue.put((time.monotonic() + (self.delay if delayed else 0.0), chunk))
                if not chunk:
                    break
            await sender
        finally:
            sender.cancel()
            with contextlib.suppress(Exception):
                writer.close()
