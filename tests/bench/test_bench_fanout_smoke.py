"""make bench-fanout's own smoke run: N = 1 and 2 shards in one host process, a router, short windows.
It checks that the bench runs end to end and that no answer failed or was degraded; the figures are the
bench's business (docs/benchmarks.md, "Router fan-out"), not asserted here."""

from __future__ import annotations

import subprocess
import sys

import pytest
from gmco_stack.envoy import REPO_ROOT

pytestmark = pytest.mark.e2e


def test_fanout_bench_smoke_on_one_and_two_shards() -> None:
    result = subprocess.run([sys.executable, str(REPO_ROOT / "bench" / "bench_fanout.py"), "--smoke"],
                            capture_output=True, text=True, timeout=240, check=False, cwd=REPO_ROOT)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    lines = [line.split() for line in result.stdout.splitlines() if line.startswith("N=")]
    assert [w[1] for w in lines if w[2] == "logical"] == ["1", "2"]
    assert [w[1] for w in lines if w[2] == "servers"] == ["1", "2"]
    assert [w[1] for w in lines if w[2] == "floor"] == ["1", "2"]
    assert "marginal router CPU per added shard" in result.stdout
