"""gmco-stack's flags reach the stack's configuration, and a bad one stops it with a message."""

from __future__ import annotations

import pytest
from gmco_stack.__main__ import config_from, parse_args
from gmco_stack.stack import Stack


def test_envoy_runs_one_worker_unless_told(tmp_path) -> None:
    config = config_from(parse_args(["--run-dir", str(tmp_path)]))
    assert config.envoy_concurrency == 1
    argv = Stack(config).services["envoy"].argv
    assert argv[argv.index("--concurrency") + 1] == "1"
    config = config_from(parse_args(["--run-dir", str(tmp_path), "--envoy-concurrency", "3"]))
    argv = Stack(config).services["envoy"].argv
    assert argv[argv.index("--concurrency") + 1] == "3"


def test_envoy_concurrency_from_the_environment(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("GMCO_STACK_ENVOY_CONCURRENCY", "2")
    assert config_from(parse_args(["--run-dir", str(tmp_path)])).envoy_concurrency == 2


def test_negative_envoy_concurrency_is_refused_naming_the_flag(tmp_path) -> None:
    with pytest.raises(SystemExit, match="--envoy-concurrency must be >= 0"):
        config_from(parse_args(["--run-dir", str(tmp_path), "--envoy-concurrency", "-1"]))
