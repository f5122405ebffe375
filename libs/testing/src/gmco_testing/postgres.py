"""A throwaway PostgreSQL 15 server for integration tests and benchmarks.

``PostgresServer`` runs ``initdb`` and ``pg_ctl`` from ``/usr/lib/postgresql/15/bin`` (override with
``GMCO_PG_BIN``) in a fresh temporary directory, on a free loopback port, with ``fsync`` on so that
durability tests mean something. When we are root the server runs as the ``postgres`` user (PostgreSQL
refuses to run as root) through ``runuser``; otherwise as the current user. ``kill9()`` kills the
postmaster with SIGKILL (a crash), and ``start()`` afterwards runs crash recovery. Leaving the context
stops the server and deletes the directory.

    with PostgresServer() as pg:
        conn = psycopg.connect(pg.dsn)

``make system`` (scripts/setup-system.sh) installs PostgreSQL 15 when it is missing.
"""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import subprocess
import tempfile
from pathlib import Path

from gmco_testing.procs import ManagedServer, free_port, port_open, wait_until

DEFAULT_BIN = Path(os.environ.get("GMCO_PG_BIN", "/usr/lib/postgresql/15/bin"))


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class PostgresServer(ManagedServer):
    """One PostgreSQL cluster in a temporary directory; a context manager."""

    def __init__(self, bin_dir: Path = DEFAULT_BIN, user: str = "postgres", database: str = "postgres",
                 settings: dict[str, str] | None = None) -> None:
        if not (bin_dir / "initdb").exists():
            raise RuntimeError(f"{bin_dir / 'initdb'} not found: run `make system` to install PostgreSQL 15 "
                               "or set GMCO_PG_BIN to its bin directory")
        self._bin = bin_dir
        self._role = user
        self._database = database
        self._run_as = "postgres" if os.geteuid() == 0 else None
        self._settings = {
            "fsync": "on",
            "synchronous_commit": "on",
            "full_page_writes": "on",
            "listen_addresses": "127.0.0.1",
            "max_connections": "100",
            "shared_buffers": "64MB",
            "log_min_messages": "warning",
            **(settings or {}),
        }
        self.port = 0
        self.root: Path | None = None

    # ----------------------------------------------------------------------------------------------
    @property
    def dsn(self) -> str:
        """libpq URI of the server's default database."""
        return self.dsn_for(self._database)

    def dsn_for(self, database: str) -> str:
        return f"postgresql://{self._role}@127.0.0.1:{self.port}/{database}"

    @property
    def data_dir(self) -> Path:
        assert self.root is not None, "PostgresServer is not set up"
        return self.root / "data"

    @property
    def log_file(self) -> Path:
        assert self.root is not None, "PostgresServer is not set up"
        return self.root / "postgres.log"

    # ----------------------------------------------------------------------------------------------
    def _cmd(self, *args: str) -> list[str]:
        if self._run_as is None:
            return list(args)
        return ["runuser", "-u", self._run_as, "--", *args]

    def _run(self, *args: str, timeout: float = 60.0) -> None:
        proc = subprocess.run(self._cmd(*args), capture_output=True, text=True, timeout=timeout, cwd="/",
                              check=False)
        if proc.returncode != 0:
            raise RuntimeError(f"{Path(args[0]).name} failed ({proc.returncode}): {proc.stderr.strip()}"
                               f"{self._log_tail()}")

    def _log_tail(self) -> str:
        if self.root is None or not self.log_file.exists():
            return ""
        return "\n--- postgres log ---\n" + "\n".join(self.log_file.read_text(errors="replace").splitlines()[-20:])

    def setup(self) -> None:
        """Create the temporary directory and the cluster (initdb), without starting it."""
        self.root = Path(tempfile.mkdtemp(prefix="gmco-pg-"))
        if self._run_as is not None:
            entry = pwd.getpwnam(self._run_as)
            os.chown(self.root, entry.pw_uid, entry.pw_gid)
        self.root.chmod(0o700)
        self._run(str(self._bin / "initdb"), "-D", str(self.data_dir), "-U", self._role, "--auth=trust",
                  "--encoding=UTF8", "--locale=C", "--no-sync")

    def start(self, timeout: float = 60.0) -> None:
        """Start (or restart after ``stop``/``kill9``; crash recovery runs then) and wait until it accepts."""
        if self.root is None:
            self.setup()
        for attempt in range(3):
            if self.port == 0 or attempt > 0:
                self.port = free_port()
            opts = " ".join(f"-c {k}={v}" for k, v in self._settings.items())
            opts += f" -p {self.port} -k {self.root}"
            try:
                self._run(str(self._bin / "pg_ctl"), "-D", str(self.data_dir), "-l", str(self.log_file),
                          "-o", opts, "-w", "-t", str(int(timeout)), "start", timeout=timeout + 10)
            except RuntimeError:
                if attempt == 2 or port_open(self.port) is False:
                    raise
                continue  # the port was taken between free_port() and the bind: try another one
            wait_until(lambda: port_open(self.port), timeout, f"PostgreSQL on port {self.port}")
            return

    def stop(self, mode: str = "fast") -> None:
        """Clean shutdown (``pg_ctl stop -m fast``); ``start()`` brings it back on the same port."""
        if self.root is None or not self._postmaster_pid():
            return
        self._run(str(self._bin / "pg_ctl"), "-D", str(self.data_dir), "-m", mode, "-w", "stop")

    def kill9(self, timeout: float = 30.0) -> None:
        """SIGKILL the postmaster (a crash) and wait until its backends have gone too."""
        pid = self._postmaster_pid()
        if pid is None:
            return
        children = self._children(pid)
        os.kill(pid, signal.SIGKILL)
        # Backends notice the postmaster's death and exit; the next start refuses while they hold memory.
        wait_until(lambda: not any(_pid_alive(p) for p in (pid, *children)), timeout,
                   "PostgreSQL backends to exit after kill -9")

    def _postmaster_pid(self) -> int | None:
        pid_file = self.data_dir / "postmaster.pid"
        try:
            pid = int(pid_file.read_text().splitlines()[0])
        except (FileNotFoundError, IndexError, ValueError):
            return None
        return pid if _pid_alive(pid) else None

    @staticmethod
    def _children(pid: int) -> list[int]:
        out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(pid)], capture_output=True, text=True,
                             check=False)
        return [int(p) for p in out.stdout.split()]

    def cleanup(self) -> None:
        """Stop the server if it runs (immediately) and delete its directory."""
        if self.root is None:
            return
        try:
            if self._postmaster_pid():
                self.stop(mode="immediate")
        finally:
            shutil.rmtree(self.root, ignore_errors=True)
            self.root = None

    def create_database(self, name: str) -> str:
        """Create an empty database and return its DSN."""
        self._run(str(self._bin / "createdb"), "-h", "127.0.0.1", "-p", str(self.port), "-U", self._role, name)
        return self.dsn_for(name)

    # ----------------------------------------------------------------------------------------------
