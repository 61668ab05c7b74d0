from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from daemon.config import Settings
from daemon.state import Database
from daemon.testing import PLUGINS, REPO, Daemon, copy_plugin, start_daemon
from tests.postgres import PostgresServer

SDK_PLUGINS = ("demo/text_toolkit", "demo/notes")


@pytest.fixture(scope="session")
def sdk_plugins_installed() -> Path:
    """The bundled plugins' virtualenvs, made once by the daemon's own installer."""
    subprocess.run(
        [sys.executable, "-m", "daemon", "install", "--plugins", str(PLUGINS)], cwd=REPO, check=True
    )
    return PLUGINS


@pytest.fixture(scope="session")
def test_plugins_installed() -> Path:
    """The test-only plugins (``tests/plugins``: a datasource and a trigger provider on the SDK),
    their virtualenvs made once by the daemon's own installer."""
    plugins = REPO / "tests" / "plugins"
    install = [sys.executable, "-m", "daemon", "install", "--plugins", str(plugins)]
    subprocess.run(install, cwd=REPO, check=True)
    return plugins


@pytest.fixture
def start(tmp_path: Path) -> Iterator[Callable[..., Daemon]]:
    """Start daemons on loopback; each is stopped with SIGTERM (and checked for orphans) after."""
    started: list[Daemon] = []

    def _start(plugins_dir: Path, **env: Any) -> Daemon:
        n = len(started)
        daemon = start_daemon(plugins_dir, tmp_path / f"state{n}", tmp_path / f"daemon{n}.log", **env)
        started.append(daemon)
        return daemon

    yield _start
    for daemon in started:
        daemon.stop()


@pytest.fixture
def fastproto(tmp_path: Path) -> Callable[..., Path]:
    """A plugins dir holding a private copy of fastproto, optionally with start-up faults."""

    def _make(fault: dict[str, Any] | None = None, name: str = "plugins") -> Path:
        plugins = tmp_path / name
        plugins.mkdir(exist_ok=True)
        copy_plugin("fastproto", plugins, fault)
        return plugins

    return _make


@pytest.fixture(scope="module")
def sdk_daemon(sdk_plugins_installed: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    """One daemon serving every bundled plugin with the default (owner) validator."""
    tmp = tmp_path_factory.mktemp("sdk")
    daemon = start_daemon(sdk_plugins_installed, tmp / "state", tmp / "daemon.log")
    daemon.wait_ready(*SDK_PLUGINS, "demo/fastproto")
    yield daemon
    daemon.stop()


@pytest.fixture(scope="session")
def postgres() -> Iterator[PostgresServer]:
    """One real PostgreSQL server on loopback for the whole session; tests take a database each."""
    server = PostgresServer()
    try:
        server.start()
        yield server
    finally:
        server.stop()


@pytest.fixture(params=["sqlite", "postgresql"])
def database_settings(request: pytest.FixtureRequest, tmp_path: Path) -> Settings:
    """Settings for an empty database of each kind the daemon runs on (a new PostgreSQL database)."""
    if request.param == "sqlite":
        return Settings(state_dir=tmp_path / "state")
    server: PostgresServer = request.getfixturevalue("postgres")
    return Settings(state_dir=tmp_path / "state", **server.env(server.create_database()))


@pytest.fixture
def database(database_settings: Settings) -> Iterator[Database]:
    """A migrated, empty database of each kind the daemon runs on."""
    db = Database.from_settings(database_settings)
    db.migrate()
    yield db
    db.close()
