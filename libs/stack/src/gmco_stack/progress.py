"""What ``make run`` shows while the stack starts: which group of services is starting and what it waits
for, which services are ready, and each waiting service's own progress (a shard building its index prints
tqdm bars into its log; the last one is mirrored here).

On a terminal every waiting service gets a bar that follows its log's latest bar; elsewhere (CI, a file)
a status line is printed every ``line_interval`` seconds. Every service that turns healthy prints one line.
"""

from __future__ import annotations

import contextlib
import re
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import IO, Protocol

_BAR = re.compile(r"(?P<desc>[^|\r\n]*?):\s+(?P<pct>\d{1,3})%\|")


class Waitable(Protocol):
    name: str
    log_path: Path

    def ready(self) -> bool: ...


def last_bar(log_path: Path, tail_bytes: int = 8192) -> tuple[str, int] | None:
    """The latest tqdm bar written to a log (its description and percentage), or None."""
    try:
        with open(log_path, "rb") as f:
            f.seek(0, 2)
            size = f.tell()
            f.seek(max(0, size - tail_bytes))
            text = f.read().decode(errors="replace")
    except OSError:
        return None
    for segment in reversed(re.split(r"[\r\n]", text)):
        m = _BAR.search(segment)
        if m:
            return m.group("desc").strip(), min(100, int(m.group("pct")))
    return None


class StartupReporter:
    def __init__(self, stream: IO[str] | None = None, interval: float = 0.5, line_interval: float = 10.0,
                 bars: bool | None = None) -> None:
        self.stream = stream or sys.stderr
        self.interval = interval
        self.line_interval = line_interval
        self.bars = self.stream.isatty() if bars is None else bars
        self.started = time.monotonic()

    def say(self, text: str) -> None:
        print(f"gmco-stack: [{time.monotonic() - self.started:5.1f}s] {text}", file=self.stream, flush=True)

    @contextlib.contextmanager
    def group(self, services: Sequence[Waitable], waits_for: str) -> Iterator[None]:
        """Report on ``services`` until the block ends (they are ready, or starting failed)."""
        self.say(f"starting {', '.join(s.name for s in services)}: {waits_for}")
        stop = threading.Event()
        waiting = {s.name: s for s in services}
        begun = time.monotonic()
        thread = threading.Thread(target=self._watch, args=(waiting, begun, stop), daemon=True)
        thread.start()
        try:
            yield
        finally:
            stop.set()
            thread.join(5)
        # The block ended normally: every service of the group passed its readiness check.
        for name in list(waiting):
            self.say(f"{name} ready ({time.monotonic() - begun:.1f} s)")

    def _watch(self, waiting: dict[str, Waitable], begun: float, stop: threading.Event) -> None:
        bars: dict[str, object] = {}
        last_line = time.monotonic()
        try:
            while waiting and not stop.is_set():
                for name, svc in list(waiting.items()):
                    ok = False
                    with contextlib.suppress(Exception):
                        ok = svc.ready()
                    if ok:
                        del waiting[name]
                        bar = bars.pop(name, None)
                        if bar is not None:
                            bar.close()  # type: ignore[attr-defined]
                        self.say(f"{name} ready ({time.monotonic() - begun:.1f} s)")
                if self.bars:
                    self._draw(waiting, bars)
                elif waiting and time.monotonic() - last_line >= self.line_interval:
                    last_line = time.monotonic()
                    self.say("waiting for " + ", ".join(f"{n} ({self._phase(s)})" for n, s in waiting.items()))
                stop.wait(self.interval)
        finally:
            for bar in bars.values():
                bar.close()  # type: ignore[attr-defined]

    @staticmethod
    def _phase(svc: Waitable) -> str:
        bar = last_bar(svc.log_path)
        return f"{bar[0]} {bar[1]}%" if bar else "starting"

    def _draw(self, waiting: dict[str, Waitable], bars: dict[str, object]) -> None:
        from tqdm import tqdm

        for name, svc in waiting.items():
            bar = bars.get(name)
            if bar is None:
                bar = bars[name] = tqdm(total=100, desc=name, unit="%", file=self.stream, leave=False,
                                        bar_format="{desc}: {percentage:3.0f}%|{bar}| {elapsed}")
            found = last_bar(svc.log_path)
            bar.set_description_str(f"{name}: {found[0]}" if found else f"{name}: starting")  # type: ignore[attr-defined]
            bar.n = found[1] if found else 0  # type: ignore[attr-defined]
            bar.refresh()  # type: ignore[attr-defined]
