"""``gmco ope``: off-policy evaluation from the rl_state feedback log (``gmco_rl_state.ope``)."""

from __future__ import annotations

import sys

import click


@click.command("ope", context_settings={"ignore_unknown_options": True, "allow_extra_args": True,
                                        "help_option_names": []})
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
def ope(args: tuple[str, ...]) -> None:
    """Estimate a target policy's value from logged impressions (IPS, SNIPS, DM, DR); see `gmco ope --help`."""
    from gmco_rl_state.ope import main

    sys.exit(main(list(args)))
