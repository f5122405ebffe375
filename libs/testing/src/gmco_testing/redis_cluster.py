"""Throwaway Redis servers for integration tests and benchmarks: a 6-node cluster or a single node.

Both run Debian's ``redis-server`` (``make system`` / scripts/setup-system.sh installs it; override the
binaries with ``GMCO_REDIS_SERVER`` and ``GMCO_REDIS_CLI``) on free loopback ports, each node in its own
directory under a fresh temporary directory, with persistence off (``appendonly no``, ``save ""``).
Leaving the context stops every process and deletes the directory, so no ``nodes.conf`` survives a run.

    with RedisCluster() as cluster:                # 3 masters + 3 replicas, cluster_state:ok everywhere
        client = redis.asyncio.cluster.RedisCluster(
            startup_nodes=[ClusterNode(h, p) for h, p in cluster.startup_nodes])
        victim = cluster.master_for_key("rec:v2:{u1}:ctx:1")
        cluster.kill9(victim)                        # crash a master; its replica takes over
        cluster.wait_failover(victim)                # ... within a few cluster-node-timeouts

    with RedisServer() as node:                     # one plain node
        client = redis.asyncio.Redis.from_url(node.url)

``cluster-node-timeout`` is small (1000 ms by default) so that a replica is promoted within a few
seconds of a master's death.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Self

from gmco_testing.procs import ManagedServer, free_port, kill9, stop_process, wait_until

REDIS_SERVER = os.environ.get("GMCO_REDIS_SERVER", "redis-server")
REDIS_CLI = os.environ.get("GMCO_REDIS_CLI", "redis-cli")
HOST = "127.0.0.1"
CLUSTER_SLOTS = 16384


def _require(binary: str) -> str:
    path = shutil.which(binary)
    if path is None:
        raise RuntimeError(f"{binary} not found: run `make system` (installs Debian's redis-server) "
                           "or set GMCO_REDIS_SERVER / GMCO_REDIS_CLI")
    return path


def redis_cli(port: int, *args: str, timeout: float = 10.0) -> str:
    """Run one ``redis-cli`` command against a loopback node and return its stdout."""
    proc = subprocess.run([_require(REDIS_CLI), "-h", HOST, "-p", str(port), *args],
                          check=False, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"redis-cli -p {port} {' '.join(args)}: {proc.stderr.strip() or proc.stdout.strip()}")
    return proc.stdout


def _info(port: int, section: str) -> dict[str, str]:
    out = redis_cli(port, "INFO", section, timeout=2.0)
    return dict(line.split(":", 1) for line in out.splitlines() if ":" in line and not line.startswith("#"))


def command_calls(port: int) -> dict[str, int]:
    """``INFO commandstats`` of one node as {command: calls}, e.g. {"mget": 12, "set": 40}."""
    calls = {}
    for name, stats in _info(port, "commandstats").items():
        fields = dict(kv.split("=", 1) for kv in stats.split(","))
        calls[name.removeprefix("cmdstat_")] = int(fields["calls"])
    return calls


@dataclass
class RedisNode:
    """One ``redis-server`` process on a loopback port."""

    port: int
    directory: Path
    extra_config: tuple[str, ...] = ()
    process: subprocess.Popen | None = None

    @property
    def address(self) -> str:
        return f"{HOST}:{self.port}"

    def start(self, attempts: int = 3) -> None:
        """Start and wait for PING; a port taken since it was picked is replaced by a fresh one."""
        for attempt in range(attempts):
            try:
                self._start_once()
                return
            except RuntimeError:
                self.stop()
                if attempt == attempts - 1 or "Address already in use" not in self.log_tail():
                    raise
                self.port = free_port()
                self.extra_config = tuple(f"cluster-port {free_port()}" if c.startswith("cluster-port ") else c
                                          for c in self.extra_config)

    def _start_once(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        config = [
            f"port {self.port}", f"bind {HOST}", "protected-mode no", f"dir {self.directory}",
            "appendonly no", 'save ""', "daemonize no", f"logfile {self.directory / 'redis.log'}",
            *self.extra_config,
        ]
        conf = self.directory / "redis.conf"
        conf.write_text("\n".join(config) + "\n")
        self.process = subprocess.Popen([_require(REDIS_SERVER), str(conf)], stdout=subprocess.DEVNULL,
                                        stderr=subprocess.PIPE, cwd=self.directory)
        try:
            wait_until(lambda: redis_cli(self.port, "PING", timeout=1.0).strip() == "PONG", 20.0,
                       f"redis-server on port {self.port}", self.process)
        except (RuntimeError, TimeoutError) as exc:
            raise RuntimeError(f"{exc}\n--- redis log ---\n{self.log_tail()}") from None

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def kill9(self) -> None:
        """SIGKILL the server (a crash: no shutdown, no save)."""
        if self.process is not None:
            kill9(self.process)

    def stop(self) -> None:
        if self.process is not None:
            stop_process(self.process, timeout=5.0)
            if self.process.stderr is not None:
                self.process.stderr.close()

    def info(self, section: str) -> dict[str, str]:
        return _info(self.port, section)

    def log_tail(self, lines: int = 20) -> str:
        log = self.directory / "redis.log"
        return "\n".join(log.read_text(errors="replace").splitlines()[-lines:]) if log.exists() else ""


class _Servers(ManagedServer):
    """Temporary directory and teardown shared by the single node and the cluster."""

    def __init__(self, prefix: str) -> None:
        self._prefix = prefix
        self.root: Path | None = None
        self.nodes: list[RedisNode] = []

    def _new_node(self, extra_config: tuple[str, ...] = (), cluster: bool = False) -> RedisNode:
        assert self.root is not None
        port = free_port()
        if cluster:
            # The bus port defaults to port + 10000, which may be taken or above 65535: pick one too.
            bus = free_port()
            while bus == port:
                bus = free_port()
            extra_config = (*extra_config, f"cluster-port {bus}")
        return RedisNode(port, self.root / str(port), extra_config)

    def start(self) -> None:
        raise NotImplementedError

    def close(self) -> None:
        """Stop every node and delete the directory (nodes.conf, logs)."""
        for node in self.nodes:
            node.stop()
        if self.root is not None:
            shutil.rmtree(self.root, ignore_errors=True)
            self.root = None

    def cleanup(self) -> None:
        self.close()

    def __enter__(self) -> Self:
        self.root = Path(tempfile.mkdtemp(prefix=self._prefix))
        return super().__enter__()


class RedisServer(_Servers):
    """A single Redis node; a context manager. ``url`` is ``redis://127.0.0.1:<port>/0``."""

    def __init__(self) -> None:
        super().__init__("gmco-redis-")

    def start(self) -> None:
        node = self._new_node()
        self.nodes = [node]
        node.start()

    @property
    def node(self) -> RedisNode:
        return self.nodes[0]

    @property
    def port(self) -> int:
        return self.node.port

    @property
    def url(self) -> str:
        return f"redis://{HOST}:{self.port}/0"


class RedisCluster(_Servers):
    """A Redis Cluster of ``masters`` masters with ``replicas`` replicas each; a context manager.

    ``startup_nodes`` is a list of (host, port) for every node; ``nodes_setting`` is the same as
    ``host:port,host:port`` (the form the cache service reads from ``GMCO_CACHE_REDIS_NODES``).
    """

    def __init__(self, masters: int = 3, replicas: int = 1, node_timeout_ms: int = 1000,
                 ready_timeout: float = 60.0) -> None:
        super().__init__("gmco-redis-cluster-")
        if masters < 3:
            raise ValueError("redis-cli --cluster create needs at least 3 masters")
        self.masters = masters
        self.replicas = replicas
        self.node_timeout_ms = node_timeout_ms
        self.ready_timeout = ready_timeout

    def start(self, attempts: int = 2) -> None:
        """Start the nodes, create the cluster and wait for it; on a failure, once more from scratch."""
        for attempt in range(attempts):
            try:
                self._start_once()
                return
            except (RuntimeError, TimeoutError):
                for node in self.nodes:
                    node.stop()
                if attempt == attempts - 1:
                    raise

    def _start_once(self) -> None:
        config = ("cluster-enabled yes", "cluster-config-file nodes.conf",
                  f"cluster-node-timeout {self.node_timeout_ms}",
                  # Keep serving the slots that are still covered while a master is down.
                  "cluster-require-full-coverage no", "cluster-replica-validity-factor 0")
        self.nodes = [self._new_node(config, cluster=True) for _ in range(self.masters * (1 + self.replicas))]
        for node in self.nodes:
            node.start()
        create = subprocess.run(
            [_require(REDIS_CLI), "--cluster", "create", *(n.address for n in self.nodes),
             "--cluster-replicas", str(self.replicas), "--cluster-yes"],
            check=False, capture_output=True, text=True, timeout=60,
        )
        if create.returncode != 0 or "[OK] All 16384 slots covered" not in create.stdout:
            raise RuntimeError(f"redis-cli --cluster create failed ({create.returncode}):\n"
                               f"{create.stdout[-2000:]}\n{create.stderr[-2000:]}")
        self.wait_ready(self.ready_timeout)

    # -- topology ----------------------------------------------------------------------------------
    @property
    def startup_nodes(self) -> list[tuple[str, int]]:
        return [(HOST, n.port) for n in self.nodes]

    @property
    def nodes_setting(self) -> str:
        return ",".join(n.address for n in self.nodes)

    def live_nodes(self) -> list[RedisNode]:
        return [n for n in self.nodes if n.alive]

    def _cluster_ok(self, node: RedisNode) -> bool:
        return "cluster_state:ok" in redis_cli(node.port, "CLUSTER", "INFO", timeout=2.0)

    def wait_ready(self, timeout: float = 60.0) -> None:
        """Wait until every live node reports ``cluster_state:ok`` and sees every live node's slots."""

        def ready() -> bool:
            live = self.live_nodes()
            if not all(self._cluster_ok(n) for n in live):
                return False
            expected = len(live)
            return all(self._known_live_count(n) == expected for n in live) and self._slots_covered()

        wait_until(ready, timeout, "Redis Cluster cluster_state:ok on every node", interval=0.1)

    def _known_live_count(self, node: RedisNode) -> int:
        lines = redis_cli(node.port, "CLUSTER", "NODES", timeout=2.0).splitlines()
        return sum(1 for line in lines if "fail" not in line.split()[2] and "disconnected" not in line)

    def _slots_covered(self) -> bool:
        covered = 0
        for _start, _end, master in self.slot_ranges():
            covered += _end - _start + 1
            if not master.alive:
                return False
        return covered == CLUSTER_SLOTS

    def slot_ranges(self) -> list[tuple[int, int, RedisNode]]:
        """(first slot, last slot, master node) as one live node sees the cluster now."""
        by_port = {n.port: n for n in self.nodes}
        source = self.live_nodes()[0]
        ranges = []
        for line in redis_cli(source.port, "CLUSTER", "NODES", timeout=2.0).splitlines():
            fields = line.split()
            if "master" not in fields[2] or "fail" in fields[2]:
                continue
            port = int(fields[1].split("@")[0].rsplit(":", 1)[1])
            for part in fields[8:]:
                if part.startswith("["):
                    continue  # a slot being migrated
                first, _, last = part.partition("-")
                ranges.append((int(first), int(last or first), by_port[port]))
        return sorted(ranges, key=lambda r: r[0])

    def masters_now(self) -> list[RedisNode]:
        return sorted({id(node): node for _s, _e, node in self.slot_ranges()}.values(), key=lambda n: n.port)

    def master_for_slot(self, slot: int) -> RedisNode:
        for first, last, node in self.slot_ranges():
            if first <= slot <= last:
                return node
        raise LookupError(f"slot {slot} is not covered")

    def master_for_key(self, key: str | bytes) -> RedisNode:
        slot = int(redis_cli(self.live_nodes()[0].port, "CLUSTER", "KEYSLOT",
                             key if isinstance(key, str) else key.decode()).strip())
        return self.master_for_slot(slot)

    # -- faults ------------------------------------------------------------------------------------
    def kill9(self, node: RedisNode) -> None:
        """SIGKILL one node (use ``master_for_key`` or ``masters_now`` to pick a master)."""
        node.kill9()

    def wait_failover(self, dead: RedisNode, timeout: float = 30.0) -> None:
        """Wait until a replica has taken over every slot of ``dead`` and the cluster is ok again."""
        wait_until(lambda: dead not in self.masters_now() and self._slots_covered()
                   and all(self._cluster_ok(n) for n in self.live_nodes()),
                   timeout, f"failover of the master on port {dead.port}", interval=0.1)

    def command_calls(self) -> dict[int, dict[str, int]]:
        """``INFO commandstats`` calls per live node: {port: {command: calls}}."""
        return {n.port: command_calls(n.port) for n in self.live_nodes()}

    def reset_stats(self) -> None:
        for node in self.live_nodes():
            redis_cli(node.port, "CONFIG", "RESETSTAT")

    def flushall(self) -> None:
        for node in self.masters_now():
            redis_cli(node.port, "FLUSHALL")
