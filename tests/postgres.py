"""A real PostgreSQL server for the tests: Debian's binaries, a throw-away cluster on loopback.

One server per test session (``initdb`` takes a few seconds); each test gets a database of its
own. PostgreSQL refuses to run as root, so as root (CI) the cluster belongs to ``nobody`` and
its programs run under that uid through ``setpriv``.
"""

from __future__ import annotations

import contextlib
import glob
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import psycopg

USER = "daemon"
PASSWORD = "secret-for-tests"


def _bin_dir() -> Path:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(p.split("/")[4]))
    assert found, "PostgreSQL is missing: scripts/system-deps.sh installs Debian's postgresql"
    return Path(found[-1]).parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class PostgresServer:
    """A cluster in a temporary directory; :meth:`stop` removes every trace of it."""

    def __init__(self) -> None:
        self.bin = _bin_dir()
        self.root = Path(tempfile.mkdtemp(prefix="daemon-pg-"))
        self.data = self.root / "data"
        self.port = _free_port()
        self.host = "127.0.0.1"
        # The server stops (fast shutdown) if the test run dies without its teardown.
        self._as = ["setpriv", "--pdeathsig", "INT", "--"]
        if os.geteuid() == 0:
            nobody = 65534
            os.chown(self.root, nobody, nobody)
            self._as[-1:] = [f"--reuid={nobody}", f"--regid={nobody}", "--clear-groups", "--"]
        self.root.chmod(0o700)
        self.process: subprocess.Popen[bytes] | None = None

    def _run(self, *argv: str) -> None:
        subprocess.run([*self._as, *argv], check=True, capture_output=True, cwd=self.root, timeout=120)

    def start(self) -> None:
        password_file = self.root / "password"
        password_file.write_text(PASSWORD + "\n")
        if os.geteuid() == 0:
            os.chown(password_file, 65534, 65534)
        self._run(
            str(self.bin / "initdb"),
            f"--pgdata={self.data}",
            f"--username={USER}",
            f"--pwfile={password_file}",
            "--auth=scram-sha-256",
            "--encoding=UTF8",
            "--no-sync",
        )
        self.log = (self.root / "postgres.log").open("wb")
        argv = [
            str(self.bin / "postgres"),
            "-D", str(self.data),
            "-p", str(self.port),
            "-c", f"listen_addresses={self.host}",
            "-c", f"unix_socket_directories={self.root}",
            "-c", "fsync=off",  # a test cluster: durability across power loss is not the point
            "-c", "synchronous_commit=off",
            "-c", "full_page_writes=off",
            "-c", "max_connections=200",
            "-c", "shared_buffers=16MB",
        ]  # fmt: skip
        self.process = subprocess.Popen([*self._as, *argv], stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 60
        while True:
            try:
                psycopg.connect(**self.params("postgres"), connect_timeout=2).close()
                return
            except psycopg.OperationalError:
                if self.process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"PostgreSQL did not start: {self.log_text()}") from None
                time.sleep(0.1)

    def log_text(self) -> str:
        return (self.root / "postgres.log").read_text(errors="replace")[-4000:]

    def params(self, database: str) -> dict[str, Any]:
        return {"host": self.host, "port": self.port, "user": USER, "password": PASSWORD, "dbname": database}

    def env(self, database: str) -> dict[str, str]:
        """The daemon's ``DB_*`` settings for ``database`` on this server."""
        return {
            "DB_HOST": self.host,
            "DB_PORT": str(self.port),
            "DB_USERNAME": USER,
            "DB_PASSWORD": PASSWORD,
            "DB_DATABASE": database,
        }

    def create_database(self) -> str:
        name = f"t_{uuid.uuid4().hex[:12]}"
        with psycopg.connect(**self.params("postgres"), autocommit=True) as connection:
            connection.execute(f'CREATE DATABASE "{name}"')
        return name

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)  # "fast" shutdown: clients are disconnected
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        with contextlib.suppress(AttributeError):
            self.log.close()
        shutil.rmtree(self.root, ignore_errors=True)
