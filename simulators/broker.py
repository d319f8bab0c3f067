"""A real Mosquitto broker spawned on a free port, for the tests, the benchmarks and the demo: started,
stopped, killed and restarted at will.

Each broker gets its own directory (config, persistence file, log, password file, ACL, certificates), so it
never shares state with another one or with a broker the machine runs on 1883. ``./run`` installs Debian's
``mosquitto`` and ``mosquitto-clients`` where they are missing.
"""
from __future__ import annotations

import getpass
import os
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

MOSQUITTO = shutil.which("mosquitto") or "/usr/sbin/mosquitto"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass(frozen=True)
class TlsFiles:
    ca: Path
    cert: Path
    key: Path


def make_tls(directory: Path, host: str = "127.0.0.1") -> TlsFiles:
    """A throwaway CA and a server certificate for ``host`` (as IP and DNS name), made with openssl."""
    directory.mkdir(parents=True, exist_ok=True)
    ca, ca_key = directory / "ca.crt", directory / "ca.key"
    cert, key, csr = directory / "server.crt", directory / "server.key", directory / "server.csr"
    ext = directory / "san.ext"
    ext.write_text(f"subjectAltName=IP:{host},DNS:localhost\n")
    run = lambda *args: subprocess.run(["openssl", *args], check=True, capture_output=True)  # noqa: E731
    run("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=feikong test CA",
        "-keyout", str(ca_key), "-out", str(ca))
    run("req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN={host}", "-keyout", str(key), "-out", str(csr))
    run("x509", "-req", "-in", str(csr), "-CA", str(ca), "-CAkey", str(ca_key), "-CAcreateserial", "-days", "2",
        "-extfile", str(ext), "-out", str(cert))
    return TlsFiles(ca, cert, key)


class Broker:
    """One Mosquitto process. ``users`` (name -> password) turns anonymous access off; ``acl`` is the text of
    an ACL file; ``tls`` serves TLS only. Persistence is on, so a graceful restart keeps sessions and queues."""

    def __init__(self, directory: Path, *, users: dict[str, str] | None = None, acl: str | None = None,
                 tls: TlsFiles | None = None, max_queued: int = 0) -> None:
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.host, self.port = "127.0.0.1", free_port()
        self.users, self.acl, self.tls = users, acl, tls
        self.max_queued = max_queued
        self.proc: subprocess.Popen | None = None
        self._write_config()

    def _write_config(self) -> None:
        lines = [f"listener {self.port} {self.host}",
                 # started as root, mosquitto drops to user "mosquitto", who cannot write to this test's
                 # directory: its persistence file (sessions, queued messages) would silently never be saved
                 f"user {getpass.getuser()}",
                 "persistence true", f"persistence_location {self.dir}/",
                 # 0 = no limit: the default (1000) drops a burst queued for a subscriber that is away
                 f"max_queued_messages {self.max_queued}",
                 # without it, Nagle's algorithm holds each small reply ~40 ms (concentrator round trips: 44 ms
                 # each, 1 ms with it)
                 "set_tcp_nodelay true",
                 "log_dest file " + str(self.dir / "mosquitto.log"),
                 "log_type error", "log_type warning", "log_type notice"]
        if self.users is None:
            lines.append("allow_anonymous true")
        else:
            pw = self.dir / "passwd"
            pw.write_text("".join(f"{u}:{p}\n" for u, p in self.users.items()))
            pw.chmod(0o600)
            subprocess.run(["mosquitto_passwd", "-U", str(pw)], check=True, capture_output=True)
            lines += ["allow_anonymous false", f"password_file {pw}"]
        if self.acl is not None:
            acl = self.dir / "acl"
            acl.write_text(self.acl)
            acl.chmod(0o600)
            lines.append(f"acl_file {acl}")
        if self.tls is not None:
            lines += [f"cafile {self.tls.ca}", f"certfile {self.tls.cert}", f"keyfile {self.tls.key}"]
        (self.dir / "mosquitto.conf").write_text("\n".join(lines) + "\n")

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self, timeout: float = 10.0) -> "Broker":
        assert not self.running
        self.proc = subprocess.Popen([MOSQUITTO, "-c", str(self.dir / "mosquitto.conf")],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"mosquitto exited ({self.proc.returncode}): {self.proc.stderr.read().decode()}"
                                   f"{self.log()}")
            try:
                with socket.create_connection((self.host, self.port), timeout=0.2):
                    return self
            except OSError:
                time.sleep(0.02)
        raise RuntimeError(f"mosquitto did not listen on {self.port} within {timeout}s: {self.log()}")

    def stop(self) -> None:
        """Graceful: the broker saves its sessions and queued messages to disk first."""
        if self.running:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(10)
        self._release()

    def kill(self) -> None:
        if self.running:
            self.proc.kill()
            self.proc.wait(10)
        self._release()

    def _release(self) -> None:
        if self.proc is not None and self.proc.stderr is not None:
            self.proc.stderr.close()

    def restart(self) -> None:
        self.stop()
        self.start()

    def log(self) -> str:
        path = self.dir / "mosquitto.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def __enter__(self) -> "Broker":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.kill()


def mosquitto_available() -> bool:
    return os.path.exists(MOSQUITTO)
