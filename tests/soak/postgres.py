"""A private PostgreSQL server for one soak: its own data directory and free port, stopped and started at will.

The shared test server (tests/conftest.py, FEIKONG_PG_DSN) cannot be restarted under the other tests' feet,
so the soak makes its own with Debian's binaries (/usr/lib/postgresql/*/bin; ``./run`` installs
``postgresql`` where they are missing). initdb refuses to run as root: every server command runs as the
``postgres`` OS user (runuser) when this process is root. Trust authentication on 127.0.0.1 only.
"""
from __future__ import annotations

import glob
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import psycopg

from simulators.broker import free_port


def pg_bin_dir() -> Path:
    """The newest Debian PostgreSQL's binaries (or the directory of ``initdb`` on the PATH)."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"),
                   key=lambda p: [int(x) for x in Path(p).parent.parent.name.split(".") if x.isdigit()])
    if found:
        return Path(found[-1]).parent
    on_path = shutil.which("initdb")
    if on_path:
        return Path(on_path).parent
    raise RuntimeError("no PostgreSQL server binaries (initdb): `./run test` installs Debian's postgresql")


class PrivatePostgres:
    """``start()``, ``stop(mode)``, ``restart(mode)``; ``dsn`` names the database ``feikong``. ``mode`` is
    pg_ctl's: ``fast`` (clean) or ``immediate`` (a crash: the next start replays the WAL)."""

    def __init__(self) -> None:
        # a directory of its own, outside the caller's (pytest's tmp_path is 0700 root: postgres cannot enter)
        self.dir = Path(tempfile.mkdtemp(prefix="feikong-soak-pg-"))
        self.data = self.dir / "data"
        self.port = free_port()
        self.bin = pg_bin_dir()
        self.as_postgres = os.geteuid() == 0
        self.dsn = f"postgresql://postgres@127.0.0.1:{self.port}/feikong"
        self._initialised = False

    def _run(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        cmd = [str(self.bin / args[0]), *args[1:]]
        if self.as_postgres:
            cmd = ["runuser", "-u", "postgres", "--", *cmd]
        result = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        if check and result.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)}: exit {result.returncode}: {result.stderr or result.stdout}")
        return result

    def _init(self) -> None:
        if self.as_postgres:
            shutil.chown(self.dir, "postgres", "postgres")
        self._run("initdb", "-D", str(self.data), "-U", "postgres", "--auth=trust", "-E", "UTF8",
                  "--no-instructions")
        # the soak kills processes, never the machine: fsync buys nothing here and costs the 2-core box dearly
        with open(self.data / "postgresql.conf", "a") as conf:
            conf.write(f"\nlisten_addresses = '127.0.0.1'\nport = {self.port}\nunix_socket_directories = ''\n"
                       "fsync = off\nfull_page_writes = off\nmax_connections = 50\nshared_buffers = 64MB\n")
        self._initialised = True

    @property
    def running(self) -> bool:
        return self._initialised and self._run("pg_ctl", "status", "-D", str(self.data), check=False).returncode == 0

    def start(self, timeout: float = 60.0) -> "PrivatePostgres":
        if not self._initialised:
            self._init()
        result = self._run("pg_ctl", "start", "-w", "-t", str(int(timeout)), "-D", str(self.data),
                           "-l", str(self.dir / "postgres.log"), check=False)
        if result.returncode != 0:
            raise RuntimeError(f"PostgreSQL did not start: {result.stderr or result.stdout}\n{self.log()[-2000:]}")
        self._wait_ready(timeout)
        return self

    def _wait_ready(self, timeout: float) -> None:
        admin = self.dsn.rsplit("/", 1)[0] + "/postgres"
        deadline = time.monotonic() + timeout
        while True:
            try:
                with psycopg.connect(admin, autocommit=True, connect_timeout=3) as conn:
                    if not conn.execute("SELECT 1 FROM pg_database WHERE datname = 'feikong'").fetchone():
                        conn.execute("CREATE DATABASE feikong")
                    return
            except psycopg.OperationalError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)

    def stop(self, mode: str = "fast") -> None:
        if self.running:
            self._run("pg_ctl", "stop", "-w", "-m", mode, "-D", str(self.data), check=False)

    def restart(self, mode: str = "fast") -> None:
        self.stop(mode)
        self.start()

    def dump(self, path: Path) -> None:
        """The database as SQL (pg_dump) into ``path``: what a failed soak leaves behind to look at."""
        Path(path).write_text(self._run("pg_dump", "--no-owner", "-d", self.dsn).stdout)

    def log(self) -> str:
        path = self.dir / "postgres.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def __enter__(self) -> "PrivatePostgres":
        return self.start()

    def close(self) -> None:
        """Stopped (as a crash would) and its directory removed."""
        self.stop("immediate")
        shutil.rmtree(self.dir, ignore_errors=True)

    def __exit__(self, *exc) -> None:
        self.close()
