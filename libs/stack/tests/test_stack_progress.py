"""make run's start-up display: a waiting service's own progress bar is read from its log and shown; each
service that turns ready is announced once."""

from __future__ import annotations

import io
import time
from dataclasses import dataclass, field
from pathlib import Path

from gmco_stack.progress import StartupReporter, last_bar


def test_last_bar_reads_the_latest_tqdm_update(tmp_path: Path) -> None:
    log = tmp_path / "shard-0.log"
    assert last_bar(log) is None  # no log yet
    log.write_text('{"level": "INFO", "msg": "loading"}\n')
    assert last_bar(log) is None
    log.write_text("select slots:   0%|          | 0/4 [00:00<?]\rselect slots: 100%|##########| 4/4\n"
                   "ivf rows:  12%|#         | 3/25 [00:01<00:09]\rivf rows:  48%|####      | 12/25 [00:05<00:05]")
    assert last_bar(log) == ("ivf rows", 48)


@dataclass
class Fake:
    name: str
    log_path: Path
    ready_at: float
    calls: list[float] = field(default_factory=list)

    def ready(self) -> bool:
        self.calls.append(time.monotonic())
        return time.monotonic() >= self.ready_at


def test_lines_name_what_is_awaited_and_each_service_once_ready(tmp_path: Path) -> None:
    (tmp_path / "shard-0.log").write_text("hnsw build:  30%|###       | 3k/10k")
    now = time.monotonic()
    services = [Fake("cache", tmp_path / "cache.log", now), Fake("shard-0", tmp_path / "shard-0.log", now + 0.6)]
    out = io.StringIO()
    reporter = StartupReporter(out, interval=0.05, line_interval=0.2, bars=False)
    with reporter.group(services, "nothing"):
        while time.monotonic() < now + 1.0:
            time.sleep(0.05)
    text = out.getvalue()
    assert "starting cache, shard-0: nothing" in text
    assert "waiting for shard-0 (hnsw build 30%)" in text
    assert text.count("cache ready") == 1 and text.count("shard-0 ready") == 1
    assert text.index("cache ready") < text.index("waiting for shard-0") < text.index("shard-0 ready")


def test_bars_on_a_terminal(tmp_path: Path) -> None:
    (tmp_path / "shard-1.log").write_text("ivf rows:  75%|#######   | 3/4")
    now = time.monotonic()
    out = io.StringIO()
    reporter = StartupReporter(out, interval=0.05, bars=True)
    with reporter.group([Fake("shard-1", tmp_path / "shard-1.log", now + 0.4)], "nothing"):
        time.sleep(0.7)
    text = out.getvalue()
    assert "shard-1: ivf rows:  75%" in text and "shard-1 ready" in text
