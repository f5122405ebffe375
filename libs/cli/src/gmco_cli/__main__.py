"""``gmco``: one admin command for GMC-O operators.

Subcommands are listed in ``COMMANDS`` as ``name -> "module:attribute"`` (a ``click.Command``) and are
imported only when invoked or when their help is shown, so ``gmco --help`` stays fast and a subcommand's
heavy dependencies (numpy, pyarrow, grpc) load only for that subcommand.
"""

from __future__ import annotations

import importlib

import click

COMMANDS: dict[str, str] = {
    "import": "gmco_cli.import_:import_",
    "migrate": "gmco_cli.migrate:migrate",
    "ope": "gmco_cli.ope:ope",
    "plan": "gmco_cli.plan:plan",
    "slots": "gmco_cli.slots:slots",
    "stats": "gmco_cli.stats:stats",
    "warm": "gmco_cli.warm:warm",
}


class LazyGroup(click.Group):
    """A click group whose subcommands import on first use."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(COMMANDS)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        target = COMMANDS.get(cmd_name)
        if target is None:
            return None
        module, attr = target.split(":")
        return getattr(importlib.import_module(module), attr)


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
def cli() -> None:
    """Administer a GMC-O deployment: load items, inspect shards, warm the cache, plan capacity.

    Every subcommand has its own --help.
    """


def main() -> None:
    cli()


if __name__ == "__main__":
    main()
