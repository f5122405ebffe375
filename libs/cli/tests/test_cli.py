"""The gmco command: every listed subcommand imports and has a --help."""

from __future__ import annotations

import subprocess
import sys

import pytest
from click.testing import CliRunner
from gmco_cli.__main__ import COMMANDS, cli


def test_top_level_help_lists_every_command() -> None:
    result = CliRunner().invoke(cli, ["--help"])
    assert result.exit_code == 0, result.output
    for name in COMMANDS:
        assert name in result.output


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_every_command_has_help(name: str) -> None:
    result = subprocess.run([sys.executable, "-m", "gmco_cli", name, "--help"], capture_output=True, text=True,
                            timeout=60, check=False)
    assert result.returncode == 0, result.stderr
    assert "usage" in result.stdout.lower()


def test_unknown_command_says_what_exists() -> None:
    result = CliRunner().invoke(cli, ["no-such-command"])
    assert result.exit_code != 0
    assert "No such command" in result.output
