"""Where a deployment's services listen, for the subcommands that talk to them.

Either the manifest a running local stack writes (``<run dir>/stack.json``, see ``gmco_stack.stack``), or
explicit addresses: the shard replicas in the router's ``GMCO_ROUTER_SHARDS`` form
(``0=host:port|host:port,1=host:port``) and one address per other service, each defaulting to the same
environment variable the router reads and then to the service's own default port.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import click

HEALTH = {"router": "gmco.router.v1.RecommendationService", "shard": "gmco.shard.v1.ShardService",
          "cache": "gmco.cache.v1.CacheService", "ontology": "gmco.ontology.v1.OntologyService",
          "rl_state": "gmco.rl_state.v1.RLStateService"}
DEFAULTS = {"router": "127.0.0.1:50050", "cache": "127.0.0.1:50052", "ontology": "127.0.0.1:50053",
            "rl_state": "127.0.0.1:50054"}


@dataclass(frozen=True)
class Target:
    name: str  # "shard-0-r1", "cache", ...
    kind: str  # a key of HEALTH
    address: str
    shard_id: int | None = None
    metrics_url: str | None = None


def parse_shards(spec: str) -> list[Target]:
    """``0=a:1|b:2,1=c:3`` -> shard targets named shard-<id>-r<n>."""
    out = []
    for part in filter(None, (p.strip() for p in spec.split(","))):
        sid, sep, addresses = part.partition("=")
        if not sep or not sid.strip().isdigit():
            raise click.BadParameter(f"{part!r} is not <shard>=<host:port>|<host:port>", param_hint="--shards")
        for r, address in enumerate(a for a in addresses.split("|") if a):
            out.append(Target(f"shard-{int(sid)}-r{r}", "shard", address, int(sid)))
    return out


def from_manifest(path: Path) -> list[Target]:
    doc = json.loads(path.read_text())
    out = []
    for name, svc in doc["services"].items():
        if name == "envoy":
            continue
        kind = "router" if name.startswith("router-") else "shard" if name.startswith("shard-") else name
        shard_id = int(name.split("-")[1]) if kind == "shard" else None
        out.append(Target(name, kind, svc["target"], shard_id, svc.get("metrics_url")))
    return out


def stack_manifest(run_dir: Path | None) -> Path | None:
    """The manifest of a running local stack: ``run_dir``'s, else that of $GMCO_STACK_RUN_DIR (the stack's own
    variable) or ./.run when it exists."""
    path = (run_dir or Path(os.environ.get("GMCO_STACK_RUN_DIR") or ".run")) / "stack.json"
    if path.exists():
        return path
    if run_dir is not None:
        raise click.BadParameter(f"{path} does not exist: is the local stack (make run) running there?",
                                 param_hint="--stack")
    return None


def manifest_doc(run_dir: Path | None) -> dict:
    """The running stack's manifest as a dict, or {} when there is none."""
    path = stack_manifest(run_dir)
    return json.loads(path.read_text()) if path is not None else {}


def resolve(stack: Path | None, shards: str | None, router: str | None, cache: str | None,
            ontology: str | None, rl_state: str | None) -> list[Target]:
    explicit = any(v is not None for v in (shards, router, cache, ontology, rl_state))
    manifest = None if explicit and stack is None else stack_manifest(stack)
    if manifest is not None:
        return from_manifest(manifest)
    env = os.environ
    out = parse_shards(shards if shards is not None else env.get("GMCO_ROUTER_SHARDS", ""))
    given = {"router": router, "cache": cache, "ontology": ontology, "rl_state": rl_state}
    for kind, address in given.items():
        address = address or env.get(f"GMCO_ROUTER_{kind.upper()}_TARGET") or DEFAULTS[kind]
        out.append(Target(kind, kind, address))
    return out


def target_options(fn):
    """The options every subcommand that talks to services takes."""
    for option in reversed([
        click.option("--stack", type=click.Path(file_okay=False, path_type=Path), default=None,
                     help="run dir of a local stack (make run); its stack.json lists every service "
                          "(default: ./.run when a stack is running there)"),
        click.option("--shards", default=None, metavar="SPEC",
                     help="shard replicas, '0=host:port|host:port,1=host:port' (default: $GMCO_ROUTER_SHARDS)"),
        click.option("--router", default=None, metavar="HOST:PORT", help="a router (default 127.0.0.1:50050)"),
        click.option("--cache", default=None, metavar="HOST:PORT",
                     help="the cache service (default $GMCO_ROUTER_CACHE_TARGET or 127.0.0.1:50052)"),
        click.option("--ontology", default=None, metavar="HOST:PORT",
                     help="the ontology service (default $GMCO_ROUTER_ONTOLOGY_TARGET or 127.0.0.1:50053)"),
        click.option("--rl-state", default=None, metavar="HOST:PORT",
                     help="the rl_state service (default $GMCO_ROUTER_RL_STATE_TARGET or 127.0.0.1:50054)"),
    ]):
        fn = option(fn)
    return fn
