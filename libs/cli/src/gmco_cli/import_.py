"""``gmco import FILE...``: bulk-load catalogue items into the catalogue log (see :mod:`gmco_cli.importer`)."""

from __future__ import annotations

import asyncio
import hashlib
import os
import sys
from pathlib import Path

import click

ATTRIBUTE_FLAGS = ("genre_ids", "rating", "region_mask", "format_mask", "release_year", "popularity")


def _default_state(dsn: str, files: tuple[Path, ...]) -> Path:
    key = hashlib.blake2b("\0".join([dsn, *(str(f.resolve()) for f in files)]).encode(), digest_size=8)
    return Path(".gmco-import") / f"{key.hexdigest()}.json"


@click.command("import")
@click.argument("files", nargs=-1, required=True, type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--stack", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="run dir of a local stack (make run; default ./.run when one runs there): its catalogue log, "
                   "dimension and shard replicas are the defaults")
@click.option("--catalog-dsn", envvar="GMCO_ROUTER_CATALOG_DSN", default=None, metavar="DSN",
              help="the catalogue log: postgresql://... or a SQLite path (default: $GMCO_ROUTER_CATALOG_DSN, else "
                   "the local stack's)")
@click.option("--dim", type=click.IntRange(1, 65536), default=None,
              help="embedding dimension every vector must have (the shards' GMCO_SHARD_DIM; default: the local "
                   "stack's, else 1024)")
@click.option("--id-column", default="media_id", show_default=True, help="column (or JSON key) of the item id")
@click.option("--vector-column", default="vector", show_default=True,
              help="column (or JSON key) of the vector: floats, or FP16 bytes in Parquet")
@click.option("--map", "mapping", multiple=True, metavar="ATTRIBUTE=COLUMN",
              help=f"take an attribute from another column, repeatable; attributes: {', '.join(ATTRIBUTE_FLAGS)}")
@click.option("--batch-size", type=click.IntRange(1, 100_000), default=5000, show_default=True,
              help="rows per log transaction")
@click.option("--duplicates", type=click.Choice(["error", "last-wins"]), default="error", show_default=True,
              help="an id seen twice in this import: stop with both positions, or keep the last row")
@click.option("--state", "state_path", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="resume file (default .gmco-import/<hash of DSN and files>.json); a rerun continues after "
                   "the rows it records")
@click.option("--restart", is_flag=True, help="ignore and replace the resume file: import every row again")
@click.option("--wait-for", "wait_for", multiple=True, metavar="HOST:PORT",
              help="a shard replica to wait for until it applied the import's last entry, repeatable")
@click.option("--wait", is_flag=True, help="wait for every shard replica of the local stack (or of "
                                           "$GMCO_ROUTER_SHARDS) to apply the import's last entry")
@click.option("--wait-timeout", type=click.FloatRange(0, min_open=True), default=600.0, show_default=True,
              help="seconds to wait for --wait-for replicas")
@click.option("--quiet", is_flag=True, help="no progress bar")
def import_(files: tuple[Path, ...], stack: Path | None, catalog_dsn: str | None, dim: int | None, id_column: str,
            vector_column: str, mapping: tuple[str, ...], batch_size: int, duplicates: str, state_path: Path | None,
            restart: bool, wait_for: tuple[str, ...], wait: bool, wait_timeout: float, quiet: bool) -> None:
    """Bulk-load items (id, vector, attributes) from Parquet, NPY + JSON Lines, or JSON Lines.

    \b
    FILE is one of:
      items.parquet   columns media_id, vector (list of floats, or FP16 bytes), attributes
      items.npy       an (n, dim) float array; items.jsonl beside it holds line i's id and attributes
      items.jsonl     {"media_id": 7, "vector": [...], "genre_ids": [3], "rating": 2, ...} per line

    Every row is validated first; a bad row stops the import with its file and row (exit 1) and nothing of
    its batch is written. Items go into the catalogue log, one transaction per batch, so every shard
    replica applies them and the writes' lsns serve read-your-writes (min_lsn). Interrupted, it resumes:
    run the same command again.
    """
    from tqdm import tqdm

    from gmco_cli.importer import ATTRIBUTES, Columns, RowError, count_rows, import_files, wait_caught_up
    from gmco_cli.targets import manifest_doc, parse_shards

    manifest = manifest_doc(stack)
    catalog_dsn = catalog_dsn or manifest.get("catalog_dsn")
    if not catalog_dsn:
        raise click.UsageError("no catalogue log: pass --catalog-dsn (or set GMCO_ROUTER_CATALOG_DSN), or run it "
                               "beside a local stack (make run)")
    dim = dim or int(manifest.get("dim", 1024))
    if wait:
        if manifest:
            wait_for = (*wait_for, *(s["target"] for n, s in manifest["services"].items() if n.startswith("shard-")))
        else:
            wait_for = (*wait_for, *(t.address for t in parse_shards(os.environ.get("GMCO_ROUTER_SHARDS", ""))))
        if not wait_for:
            raise click.UsageError("--wait: no local stack and no GMCO_ROUTER_SHARDS; name replicas with --wait-for")

    attrs = {a: a for a in ATTRIBUTES}
    for item in mapping:
        name, sep, column = item.partition("=")
        if not sep or name not in attrs or not column:
            raise click.BadParameter(f"{item!r}: want ATTRIBUTE=COLUMN with ATTRIBUTE one of "
                                     f"{', '.join(ATTRIBUTES)}", param_hint="--map")
        attrs[name] = column
    columns = Columns(id_column, vector_column, attrs)
    state = state_path or _default_state(catalog_dsn, files)
    state.parent.mkdir(parents=True, exist_ok=True)
    if restart and state.exists():
        state.unlink()
    try:
        total = sum(count_rows(f) for f in files)
    except (OSError, ValueError) as exc:
        raise click.ClickException(str(exc)) from None
    bar = tqdm(total=total, unit="item", unit_scale=True, desc="importing", disable=quiet, file=sys.stderr)
    try:
        report = asyncio.run(import_files(files, catalog_dsn, dim, columns, batch_rows=batch_size,
                                          state_path=state, duplicates=duplicates, progress=bar.update))
    except RowError as exc:
        bar.close()
        click.echo(f"gmco import: {exc}", err=True)
        click.echo("gmco import: nothing of that row's batch was written; earlier batches are committed and a "
                   "rerun after the fix resumes after them", err=True)
        sys.exit(1)
    except (OSError, ValueError) as exc:
        bar.close()
        raise click.ClickException(str(exc)) from None
    bar.close()
    click.echo(f"imported {report.appended} items ({report.skipped} already committed by an earlier run) from "
               f"{report.files} file(s) in {report.seconds:.2f} s: {report.items_per_second:,.0f} items/s; "
               f"last lsn {report.last_lsn}; resume file {state}")
    if wait_for:
        shards = tqdm(total=len(wait_for), unit="replica", desc=f"waiting for lsn {report.last_lsn}",
                      disable=quiet, file=sys.stderr)
        try:
            seconds = asyncio.run(wait_caught_up(wait_for, report.last_lsn, wait_timeout, shards.update))
        except TimeoutError as exc:
            shards.close()
            raise click.ClickException(str(exc)) from None
        shards.close()
        click.echo(f"every replica applied lsn {report.last_lsn} {seconds:.2f} s after the import")
