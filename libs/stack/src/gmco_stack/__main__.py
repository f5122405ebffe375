"""``python -m gmco_stack`` (``make run``): the whole GMC-O suite on this machine, behind a real Envoy.

Generates the demo catalogue on first use (then reuses it), starts 2 shards, cache, ontology, rl_state,
2 routers and Envoy with their embedded backends, waits until all are healthy, prints how to call it,
and runs until Ctrl-C, which stops every process. State (catalogue, snapshots, SQLite, logs) lives
under .run/.

Every flag has an environment variable (GMCO_STACK_<FLAG>). Any GMCO_<SERVICE>_* variable in the
environment is passed to that service, which is how a service is switched to its real backend, e.g.
  GMCO_RL_STATE_BACKEND=postgres GMCO_RL_STATE_POSTGRES_DSN=postgresql://... make run
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from gmco_stack.envoy import REPO_ROOT
from gmco_stack.progress import StartupReporter
from gmco_stack.stack import Stack, StackConfig, wait_for_signal

USAGE = """
GMC-O is up. Envoy listens on {target} (gRPC, plaintext, HTTP/2); set the x-user-id metadata.

Python (gmco-client sets x-user-id, deadlines and retries):
    from gmco_client import RecommendationClient

    with RecommendationClient("{target}") as client:
        reply = client.recommend("u42", k=10, context={{"region": "US", "device": "smart_tv"}})
        print(reply.router_id, reply.cache_hit, [i.media_id for i in reply.items])

Command line (buf from make setup, by reflection):
    .tools/bin/buf curl --protocol grpc --http2-prior-knowledge -H 'x-user-id: 42' \\
      -d '{{"user_id": "42", "k": 10}}' http://{target}/gmco.router.v1.RecommendationService/Recommend
    .venv/bin/gmco stats --stack {run_dir}   # every replica and service (gmco --help: import, slots, warm, ...)

k6 (load test through Envoy):
    .venv/bin/k6 run -e TARGET={target} -e DURATION=30s bench/k6/recommend.js

Processes: {pids}
Metrics (Prometheus text, one endpoint per process):
{metrics}
Envoy admin (loopback only): http://127.0.0.1:{admin}/ (its metrics: /stats/prometheus)
Logs: {logs}
Ctrl-C stops everything.
"""


def _env(name: str, default: str) -> str:
    return os.environ.get(f"GMCO_STACK_{name}", default)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="gmco-stack", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--items", type=int, default=int(_env("ITEMS", "100000")), help="catalogue size (%(default)s)")
    p.add_argument("--dim", type=int, default=int(_env("DIM", "1024")), help="embedding dimension (%(default)s)")
    p.add_argument("--shards", type=int, default=int(_env("SHARDS", "2")), help="shards (%(default)s)")
    p.add_argument("--replicas", type=int, default=int(_env("REPLICAS", "1")), help="replicas per shard (%(default)s)")
    p.add_argument("--routers", type=int, default=int(_env("ROUTERS", "2")), help="routers (%(default)s)")
    p.add_argument("--index-backend", default=_env("INDEX_BACKEND", "ivf"), help="shard index (%(default)s)")
    p.add_argument("--base-port", type=int, default=int(_env("BASE_PORT", "7000")),
                   help="services listen on base+1.. (shards), +101.. (routers), +201 cache, +301 ontology, "
                        "+401 rl_state; each one's Prometheus /metrics on its port + 2000 (%(default)s)")
    p.add_argument("--envoy-port", type=int, default=int(_env("ENVOY_PORT", "8080")), help="%(default)s")
    p.add_argument("--envoy-admin-port", type=int, default=int(_env("ENVOY_ADMIN_PORT", "9901")), help="%(default)s")
    p.add_argument("--envoy-concurrency", type=int, default=int(_env("ENVOY_CONCURRENCY", "1")),
                   help="Envoy worker threads; one suits a machine whose cores the services share (%(default)s)")
    p.add_argument("--run-dir", type=Path, default=Path(_env("RUN_DIR", str(REPO_ROOT / ".run"))), help="%(default)s")
    p.add_argument("--log-level", default=_env("LOG_LEVEL", "WARNING"), help="services' log level (%(default)s)")
    p.add_argument("--catalog-dsn", default=os.environ.get("GMCO_ROUTER_CATALOG_DSN", ""),
                   help="the durable catalogue log (postgresql://...); default: a SQLite file in the run dir")
    p.add_argument("--env", action="append", default=[], metavar="NAME=VALUE",
                   help="an extra variable for every service (repeatable)")
    return p.parse_args(argv)


def config_from(args: argparse.Namespace) -> StackConfig:
    extra = {}
    for item in args.env:
        name, sep, value = item.partition("=")
        if not sep or not name:
            raise SystemExit(f"gmco-stack: --env wants NAME=VALUE, got {item!r}")
        extra[name] = value
    if args.envoy_concurrency < 0:
        raise SystemExit(f"gmco-stack: --envoy-concurrency must be >= 0 (0 = one worker per CPU), "
                         f"got {args.envoy_concurrency}")
    if args.catalog_dsn:
        extra["GMCO_ROUTER_CATALOG_DSN"] = args.catalog_dsn
    return StackConfig(items=args.items, dim=args.dim, shards=args.shards, replicas=args.replicas,
                       routers=args.routers, index_backend=args.index_backend, run_dir=args.run_dir,
                       base_port=args.base_port, envoy_port=args.envoy_port, envoy_admin_port=args.envoy_admin_port,
                       envoy_concurrency=args.envoy_concurrency,
                       log_level=args.log_level, env=extra)


def main(argv: list[str] | None = None) -> None:
    config = config_from(parse_args(argv))
    stack = Stack(config)
    stack.reporter = StartupReporter()
    try:
        stack.start()
    except KeyboardInterrupt:
        print("\ngmco-stack: interrupted; stopped", file=sys.stderr)
        sys.exit(130)
    except (RuntimeError, TimeoutError) as exc:
        sys.exit(f"gmco-stack: could not start the stack: {exc}\nLogs are in {config.run_dir / 'logs'}")
    print(USAGE.format(target=stack.envoy_target, logs=config.run_dir / "logs",
                       pids=", ".join(f"{n}={p}" for n, p in stack.pids().items()),
                       metrics="\n".join(f"    {s.name:<10} {s.metrics_url}"
                                          for s in stack.services.values() if s.metrics_port),
                       admin=stack.envoy_admin_port, run_dir=config.run_dir), flush=True)
    try:
        wait_for_signal()
    finally:
        print("gmco-stack: stopping every process ...", flush=True)
        stack.stop()
        print("gmco-stack: stopped", flush=True)


if __name__ == "__main__":
    main()
