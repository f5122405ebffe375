"""``gmco warm``: warm the recommendation cache (``gmco_cache.warm``: through the router, or from a file)."""

from __future__ import annotations

import sys

import click


@click.command("warm", context_settings={"ignore_unknown_options": True, "allow_extra_args": True,
                                         "help_option_names": []})
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
def warm(args: tuple[str, ...]) -> None:
    """Fill the cache for a list of users, through the router's Recommend or from precomputed lists keyed like
    the router keys them; see `gmco warm --help`."""
    from gmco_cache.warm import main

    sys.exit(main(list(args)))
