"""The process as deployed: ``python -m gmco_rl_state`` starts, serves health, drains on SIGTERM."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from gmco_testing.procs import free_port, stop_process, wait_grpc_serving


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("GMCO_RL_STATE_")}
    return {**env, "GMCO_RL_STATE_LOG_FORMAT": "text", **extra}


def test_help_lists_the_environment() -> None:
    out = subprocess.run([sys.executable, "-m", "gmco_rl_state", "--help"], capture_output=True, text=True,
                         check=True, env=_env())
    assert "GMCO_RL_STATE_BACKEND" in out.stdout and "GMCO_RL_STATE_POSTGRES_DSN" in out.stdout


def test_missing_dsn_fails_at_start_naming_it() -> None:
    out = subprocess.run([sys.executable, "-m", "gmco_rl_state"], capture_output=True, text=True, check=False,
                         env=_env(GMCO_RL_STATE_BACKEND="postgres"))
    assert out.returncode == 2 and "GMCO_RL_STATE_POSTGRES_DSN" in out.stderr


def test_serves_and_drains_on_sigterm(tmp_path: Path) -> None:
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "gmco_rl_state"],
        env=_env(GMCO_RL_STATE_PORT=str(port), GMCO_RL_STATE_SQLITE_PATH=str(tmp_path / "state.sqlite3")),
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    try:
        wait_grpc_serving(f"127.0.0.1:{port}", timeout=30, proc=proc,
                          service="gmco.rl_state.v1.RLStateService")
    finally:
        code = stop_process(proc)
    assert code == 0, proc.stdout.read() if proc.stdout else ""
    assert (tmp_path / "state.sqlite3").exists()
