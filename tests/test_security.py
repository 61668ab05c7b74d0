"""Security: the server key stays in the daemon, and storage is walled off per tenant and plugin.

One daemon, logging at debug level, serves fastproto, ``demo/spy`` (fastproto behind a
shim that records every byte it receives on stdin) and the SDK ``notes`` plugin. The
key must appear in none of: a plugin's environment, command line, stdin, open files or
sockets, and the daemon's log. (``/debug/*`` and ``/metrics`` exposure belongs to
the telemetry work and is tested there.)
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest

from daemon.runtime.backwards import BackwardsServices
from daemon.state import Database, PluginStorage
from daemon.testing import Daemon, copy_plugin, start_daemon
from tests.test_runtime import FP

SPY = "demo/spy"
NOTES = "demo/notes"
SPY_SHIM = '''"""Record every byte from stdin in received.log, then run fastproto as usual."""

import os
import threading

import main

real_stdin = os.dup(0)
read_end, write_end = os.pipe()
os.dup2(read_end, 0)
os.close(read_end)


def tee() -> None:
    with open("received.log", "ab", buffering=0) as log, os.fdopen(write_end, "wb", buffering=0) as out:
        while chunk := os.read(real_stdin, 65536):
            log.write(chunk)
            out.write(chunk)


threading.Thread(target=tee, daemon=True).start()
main.main()
'''


@pytest.fixture(scope="module")
def secured(sdk_plugins_installed: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    tmp = tmp_path_factory.mktemp("security")
    plugins = tmp / "plugins"
    plugins.mkdir()
    copy_plugin("fastproto", plugins)
    spy = copy_plugin("fastproto", plugins, as_name="spy")
    (spy / "spy.py").write_text(SPY_SHIM)
    manifest = spy / "manifest.yaml"
    manifest.write_text(manifest.read_text().replace("entrypoint: main", "entrypoint: spy"))
    (plugins / "notes").symlink_to(sdk_plugins_installed / "notes", target_is_directory=True)
    daemon = start_daemon(plugins, tmp / "state", tmp / "daemon.log", log_level="debug")
    daemon.wait_ready(FP, SPY, NOTES)
    yield daemon
    daemon.stop()


def texts(events: list[Any]) -> list[str]:
    assert all(e.ok for e in events), events[-1].raw
    return [e.message["message"]["text"] for e in events if e.message["type"] == "text"]


def exercise(daemon: Daemon) -> None:
    """Every kind of traffic that could carry the key somewhere it must not go."""
    for plugin in (FP, SPY):
        daemon.invoke(plugin, "emit", {"count": 2, "variables": 2}, provider="fastproto")
        daemon.invoke(plugin, "plain", {"storage_key": "k", "invoke_other": True}, provider="fastproto")
        daemon.invoke(plugin, "emit", {"error_at": 0}, provider="fastproto")
        assert daemon.validate_credentials(plugin, {"api_key": "x"}, provider="fastproto")[-1].ok
    wrong = {**daemon.headers(FP), "X-Api-Key": daemon.key[:-1]}
    assert httpx.post(daemon.invoke_url(), headers=wrong, json={}, timeout=60).status_code == 401
    assert httpx.get(f"{daemon.url}/plugins", headers={"X-Api-Key": daemon.key}).status_code == 200


def test_the_server_key_never_reaches_a_plugin_process(secured: Daemon) -> None:
    exercise(secured)
    key = secured.key
    for plugin in (FP, SPY, NOTES):
        for pid in secured.instance_pids(plugin):
            process = psutil.Process(pid)
            environ = "\n".join(f"{k}={v}" for k, v in process.environ().items())
            assert key not in environ and "SERVER_KEY" not in environ
            assert key not in " ".join(process.cmdline())
            assert process.net_connections("all") == []  # not even the daemon's listening socket
            state = Path(secured.log_path).parent / "state"
            assert not [f.path for f in process.open_files() if f.path.startswith(str(state))]
    spy_dir = Path(psutil.Process(secured.instance_pids(SPY)[0]).cwd())
    received = (spy_dir / "received.log").read_bytes()
    assert b'"action":"invoke_tool"' in received and b'"action":"validate_tool_credentials"' in received
    assert key.encode() not in received


def test_the_server_key_never_reaches_the_log(secured: Daemon) -> None:
    exercise(secured)
    log = secured.log_path.read_text()
    assert "DEBUG" in log and "plugin demo/spy#0" in log  # the log is at its most talkative
    assert secured.key not in log


def test_storage_is_isolated_per_tenant_and_per_plugin(secured: Daemon) -> None:
    """The same key, written by two plugins under two tenants, is four separate values."""
    keys = ["plan", "../plan", "'; DROP TABLE plugin_storage; --", "ключ", "k" * 256]
    for key in keys:
        for tenant in ("tenant-a", "tenant-b"):
            for plugin in (FP, SPY):
                value = f"{plugin} {tenant} {key}"
                params = {"count": 0, "storage_key": key, "storage_value": value}
                events = secured.invoke(plugin, "plain", params, provider="fastproto", tenant=tenant)
                assert texts(events) == [value]
    # A plugin reading a key another plugin wrote under the same name finds nothing.
    secured.invoke(FP, "plain", {"count": 0, "storage_key": "note:plan", "storage_value": "x"}, tenant="t1")
    events = secured.invoke(NOTES, "read_note", {"title": "plan"}, tenant="t1")
    assert [e.message["message"] for e in events if e.message["type"] == "variable"] == [
        {"variable_name": "found", "variable_value": False, "stream": False},
        {"variable_name": "body", "variable_value": "", "stream": False},
    ]
    db = sqlite3.connect(secured.log_path.parent / "state" / "state.sqlite3")
    try:
        query = "SELECT tenant_id, plugin_id, key, value FROM plugin_storage WHERE plugin_id IN (?, ?)"
        rows = db.execute(query, (FP, SPY))
        stored = {(t, p, k): bytes(v).decode() for t, p, k, v in rows}
    finally:
        db.close()
    for key in keys:
        for tenant in ("tenant-a", "tenant-b"):
            for plugin in (FP, SPY):
                assert stored[(tenant, plugin, key)] == f"{plugin} {tenant} {key}"


def test_a_plugin_cannot_choose_the_namespace_it_writes_to(tmp_path: Path) -> None:
    """Tenant and plugin come from the session, never from what the plugin sends."""
    database = Database.sqlite(tmp_path / "s.sqlite3")
    database.migrate()
    storage = PluginStorage(database)
    services = BackwardsServices(storage)
    request = {"opt": "set", "key": "k", "value": "01", "tenant_id": "victim", "plugin_id": "other/plugin"}
    invocation = {"type": "storage", "request": request, "tenant_id": "victim", "plugin_id": "other/plugin"}
    assert asyncio.run(services.handle("t1", "a/b", invocation)) == {"data": "ok"}
    assert asyncio.run(storage.get("t1", "a/b", "k")) == b"\x01"
    assert asyncio.run(storage.get("victim", "other/plugin", "k")) is None
    database.close()


def test_the_storage_files_are_for_the_daemons_user_only(secured: Daemon) -> None:
    """Plugin data of every tenant lives there; the key file is 0600 for the same reason."""
    secured.invoke(FP, "plain", {"count": 0, "storage_key": "k"})  # the WAL files exist now
    files = list((secured.log_path.parent / "state").glob("state.sqlite3*"))
    assert len(files) == 3  # the database, its -wal and its -shm
    assert {f.name: oct(f.stat().st_mode & 0o777) for f in files} == {f.name: "0o600" for f in files}
