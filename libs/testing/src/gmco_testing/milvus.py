"""A throwaway Milvus standalone server for integration tests and benchmarks.

``MilvusServer`` runs the Milvus 2.3.5 standalone binary that the PyPI ``milvus`` wheel ("embedded Milvus",
in the workspace's dev group) ships LZMA-compressed. The binary and its libraries are unpacked once into a
cache (``$GMCO_MILVUS_CACHE``, default ``~/.cache/gmco/milvus-<version>-<digest>``; 250 MB, 4-8 s); each server
gets a fresh temporary directory for its configuration, logs and data (embedded etcd, rocksmq, segments),
and free loopback ports for every component. Leaving the context kills the server and deletes the directory.

    with MilvusServer() as milvus:
        client = pymilvus.MilvusClient(uri=milvus.uri)      # http://127.0.0.1:<proxy port>

Ports: the wheel's config template sets the gRPC ports of the proxy and the coordinators/nodes; the
embedded etcd gets its own config file (its client and peer ports are otherwise fixed at 2379/2380, so two
servers on one machine would collide). Every component advertises 127.0.0.1, so all traffic stays on
loopback, but Milvus 2.3 binds its gRPC and metrics listeners on all interfaces (it has no listen-address
setting). Teardown is SIGKILL: on SIGTERM 2.3.5 stops its root coordinator first and then the other
components retry it for minutes (seen here: still running 80 s later); the data is thrown away anyway.
On Linux the server also gets SIGKILL when the process that started it dies (``setpriv --pdeathsig``), so
a killed test run leaves no server behind.
"""

from __future__ import annotations

import hashlib
import lzma
import os
import re
import shutil
import subprocess
import sys
import tempfile
import urllib.request
from pathlib import Path

from gmco_testing.procs import ManagedServer, free_port, kill9, port_open, wait_until

HOST = "127.0.0.1"
_INSTALL = ("the `milvus` package (the Milvus 2.3.5 standalone server) is not installed: run "
            "`uv sync --all-packages --all-groups` (it is in the workspace's dev group; wheels exist for Linux "
            "x86_64 and macOS only)")
# {{ key }}, {{ key: default }}, {{ key(type): default }} in the wheel's config.yaml.template
_PLACEHOLDER = re.compile(r"\{\{\s*(\w+)(?:\(\w+\))?\s*(?::[^}]*)?\}\}")
_KEY = re.compile(r"^( *)([A-Za-z0-9_]+):")
# Overrides of the wheel's milvus.yaml for a test server. A sealed segment is flushed only once the row
# allocations the proxy got for it have expired (default 2000 ms), so each flush waited about 2.5 s for it.
TEST_SETTINGS = {"dataCoord.segment.assignmentExpiration": "500"}
_PORTS = ("root_coord_port", "proxy_port", "proxy_internal_port", "query_coord_port", "query_node_port",
          "index_coord_port", "index_node_port", "data_coord_port", "data_node_port")


def _package_data() -> tuple[str, Path]:
    """The wheel's version and its ``data`` directory (binaries, config template)."""
    try:
        import milvus
    except ImportError:
        raise RuntimeError(_INSTALL) from None
    return milvus.__version__, Path(milvus.__file__).parent / "data"


def unpack_binaries(cache: Path | None = None) -> Path:
    """The directory holding ``milvus`` and its libraries, unpacked from the wheel on first use.

    Unpacked into a sibling temporary directory and renamed into place, so concurrent first uses (two test
    runs) never see a half-written binary; the directory name carries a digest of the compressed files.
    """
    version, data = _package_data()
    packed = sorted((data / "bin").glob("*.lzma"))
    if not packed:
        raise RuntimeError(f"{data / 'bin'} holds no *.lzma files: reinstall the `milvus` package")
    digest = hashlib.sha256("".join(f"{p.name}:{p.stat().st_size}" for p in packed).encode()).hexdigest()[:12]
    root = cache or Path(os.environ.get("GMCO_MILVUS_CACHE", Path.home() / ".cache" / "gmco"))
    target = root / f"milvus-{version}-{digest}"
    if (target / "milvus").is_file():
        return target
    root.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=root))
    try:
        for src in packed:
            out = staging / src.name.removesuffix(".lzma")
            with lzma.open(src) as fin, open(out, "wb") as fout:
                shutil.copyfileobj(fin, fout, 1 << 20)
            out.chmod(0o755)
        try:
            staging.rename(target)
        except OSError:  # another run got there first
            if not (target / "milvus").is_file():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def _die_with_parent() -> list[str]:
    """A command prefix that makes the server get SIGKILL when its parent dies (util-linux's setpriv, Linux)."""
    setpriv = shutil.which("setpriv") if sys.platform == "linux" else None
    return [setpriv, "--pdeathsig", "KILL", "--"] if setpriv else []


class MilvusServer(ManagedServer):
    """One Milvus standalone process with its data in a temporary directory; a context manager."""

    def __init__(self, settings: dict[str, str] | None = None, start_timeout: float = 120.0) -> None:
        self.version, self._data = _package_data()
        self.settings = {**TEST_SETTINGS, **(settings or {})}
        self.start_timeout = start_timeout
        self.root: Path | None = None
        self.ports: dict[str, int] = {}
        self.process: subprocess.Popen | None = None

    @property
    def port(self) -> int:
        return self.ports["proxy_port"]

    @property
    def uri(self) -> str:
        """The URI for pymilvus and ``GMCO_SHARD_MILVUS_URI``."""
        return f"http://{HOST}:{self.port}"

    @property
    def log_file(self) -> Path:
        assert self.root is not None, "MilvusServer is not started"
        return self.root / "logs" / "milvus.log"

    # ----------------------------------------------------------------------------------------------
    def _write_config(self) -> Path:
        """configs/milvus.yaml from the wheel's template, and the embedded etcd's own config."""
        assert self.root is not None
        self.ports = {name: free_port() for name in (*_PORTS, "etcd_port", "etcd_peer_port", "metrics_port")}
        logs, data = self.root / "logs", self.root / "data"
        etcd_yaml = self.root / "configs" / "etcd.yaml"
        client, peer = f"http://{HOST}:{self.ports['etcd_port']}", f"http://{HOST}:{self.ports['etcd_peer_port']}"
        etcd_yaml.write_text(f"name: gmco\nlisten-client-urls: {client}\nadvertise-client-urls: {client}\n"
                             f"listen-peer-urls: {peer}\ninitial-advertise-peer-urls: {peer}\n"
                             f"initial-cluster: gmco={peer}\n")
        values = {**{k: str(v) for k, v in self.ports.items()},
                  "etcd_log_level": "warn", "etcd_log_path": str(logs / "etcd.log"),
                  "etcd_data_dir": str(data / "etcd"), "local_storage_dir": str(data),
                  "rocksmq_data_dir": str(data / "rocksmq"),
                  "system_log_path": "",  # no log files: it logs to stdout, which goes to logs/milvus.log
                  "server_pem_path": "server.pem", "server_key_path": "server.key", "ca_pem_path": "ca.pem",
                  "authorization_enabled": "false", "tls_mode": "0"}

        def fill(m: re.Match[str]) -> str:
            if m.group(1) not in values:
                raise RuntimeError(f"the milvus {self.version} config template has a setting this fixture does not "
                                   f"know: {m.group(1)}; update gmco_testing.milvus")
            return values[m.group(1)]

        lines, path, unset = [], [], dict(self.settings)
        for line in (self._data / "config.yaml.template").read_text().splitlines():
            line = _PLACEHOLDER.sub(fill, line)
            if m := _KEY.match(line):  # track the dotted path of each key, e.g. queryCoord.checkInterval
                indent, key = len(m.group(1)) // 2, m.group(2)
                path[indent:] = [key]
                dotted = ".".join(path)
                if dotted in unset:
                    line = f"{m.group(1)}{key}: {unset.pop(dotted)}"
                elif indent == 1 and key == "ip":  # the advertised address of each coordinator and node
                    line = f"  ip: {HOST}"
            lines.append(line)
            if line == "etcd:":
                lines += ["  config:", f"    path: {etcd_yaml}"]
        if unset:
            raise ValueError(f"the milvus {self.version} config template has no setting {', '.join(unset)}")
        config = self.root / "configs" / "milvus.yaml"
        config.write_text("\n".join(lines) + "\n")
        shutil.copy(self._data / "glog.conf", self.root / "configs" / "glog.conf")  # knowhere's C++ logging
        return config

    def _healthy(self) -> bool:
        url = f"http://{HOST}:{self.ports['metrics_port']}/healthz"
        with urllib.request.urlopen(url, timeout=1) as resp:
            return b"OK" in resp.read() and port_open(self.port)

    def _log_tail(self) -> str:
        if self.root is None or not self.log_file.exists():
            return ""
        tail = self.log_file.read_text(errors="replace").splitlines()[-15:]
        return "\n--- milvus log ---\n" + "\n".join(line[:400] for line in tail)

    def start(self) -> None:
        """Start on fresh free ports and wait until /healthz says OK; retried when a port was taken."""
        binaries = unpack_binaries()
        for attempt in range(3):
            self.root = Path(tempfile.mkdtemp(prefix="gmco-milvus-"))
            for sub in ("configs", "logs", "data", "run"):
                (self.root / sub).mkdir()
            self._write_config()
            env = {**os.environ, "DEPLOY_MODE": "STANDALONE", "METRICS_PORT": str(self.ports["metrics_port"]),
                   "MILVUSCONF": str(self.root / "configs"), "MILVUS_RUN_DIR": str(self.root / "run"),
                   "LD_LIBRARY_PATH": os.pathsep.join(filter(None, [str(binaries),
                                                                     os.environ.get("LD_LIBRARY_PATH")])),
                   "DYLD_LIBRARY_PATH": str(binaries)}
            with open(self.log_file, "wb") as log:
                self.process = subprocess.Popen([*_die_with_parent(), str(binaries / "milvus"), "run", "standalone"],
                                                cwd=self.root, env=env, stdout=log, stderr=subprocess.STDOUT,
                                                stdin=subprocess.DEVNULL)
            try:
                wait_until(self._healthy, self.start_timeout, f"Milvus {self.version} on port {self.port}",
                           self.process, interval=0.2)
                return
            except (RuntimeError, TimeoutError) as exc:
                tail = self._log_tail()
                self.cleanup()
                if attempt < 2 and "address already in use" in tail:
                    continue
                raise RuntimeError(f"{exc}{tail}") from None

    def cleanup(self) -> None:
        """Kill the server (see the module docstring for why not SIGTERM) and delete its directory."""
        if self.process is not None:
            kill9(self.process)
            self.process = None
        if self.root is not None:
            shutil.rmtree(self.root, ignore_errors=True)
            self.root = None

    # ----------------------------------------------------------------------------------------------
