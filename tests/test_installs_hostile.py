"""The installation routes against a hostile tenant: another tenant's ids, malformed and oversized
bodies, path characters, NULs and paging extremes. Every refusal is a 4xx in upstream's envelope,
never a 500, on SQLite and on PostgreSQL alike; nothing one tenant sends reaches another's rows."""

from __future__ import annotations

import socket
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest

from daemon.packages import build
from daemon.testing import Daemon, start_daemon
from tests import test_installs
from tests.postgres import PostgresServer
from tests.test_installs import FASTPROTO, OPEN, Api, refusal

packages = test_installs.packages  # the bundled plugins as .difypkg (a module-scoped fixture)


@pytest.fixture(params=["sqlite", "postgresql"])
def daemon(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Daemon]:
    """A daemon with an empty plugins directory, on each database it runs on."""
    env: dict[str, str] = {}
    if request.param == "postgresql":
        postgres: PostgresServer = request.getfixturevalue("postgres")
        env = postgres.env(postgres.create_database())
    (tmp_path / "plugins").mkdir()
    started = start_daemon(tmp_path / "plugins", tmp_path / "state", tmp_path / "daemon.log", **OPEN, **env)
    yield started
    started.stop()


def test_malformed_ids_identifiers_and_pages_are_refused_with_4xx(
    daemon: Daemon, packages: dict[str, bytes]
) -> None:
    api = Api(daemon, "tenant-a")
    identifier = api.upload(packages["fastproto"])
    headers = {"X-Api-Key": daemon.key}

    def post(route: str, body: Any = None) -> httpx.Response:
        return httpx.post(api.url(route), headers=headers, json=body, timeout=30)

    def get(route: str, **params: Any) -> httpx.Response:
        return httpx.get(api.url(route), headers=headers, params=params, timeout=30)

    # Ids the daemon never made (a NUL, path characters) name nothing: PostgreSQL must not see them.
    for bad in ("a\x00b", "../../etc/passwd", "x" * 5000):
        assert post("uninstall", {"plugin_installation_id": bad[:255]}).json()["data"] is True
    for path in ("a%00b", "..%2f..%2fetc", "x" * 2000):
        assert refusal(get(f"install/tasks/{path}"), 404)["error_type"] == "PluginDaemonNotFoundError"
    for path in ("a%00b", "x" * 2000):
        assert post(f"install/tasks/{path}/delete").json()["data"] is True
        assert post(f"install/tasks/{path}/delete/{identifier}").json()["data"] is True

    # "$" matched before a final newline: an identifier or tenant with one was taken as valid.
    body = {"plugin_unique_identifiers": [identifier + "\n"], "source": "package", "metas": [{}]}
    assert "plugin_unique_identifiers.0" in refusal(post("install/identifiers", body), 400)["message"]
    assert refusal(post("installation/missing", {"plugin_unique_identifiers": [identifier + "\n"]}), 400)
    assert refusal(get("fetch/identifier", plugin_unique_identifier=identifier + "\n"), 400)
    newline_tenant = f"{daemon.url}/plugin/{'t' * 64}%0A/management/install/tasks"
    assert refusal(httpx.get(newline_tenant, headers=headers, params={"page": 1, "page_size": 1}), 400)

    # A source longer than the column (63, as upstream's) is refused before any runtime starts.
    body = {"plugin_unique_identifiers": [identifier], "source": "s" * 64, "metas": [{}]}
    assert "source" in refusal(post("install/identifiers", body), 400)["message"]
    upgrade = {
        "original_plugin_unique_identifier": identifier,
        "new_plugin_unique_identifier": identifier[:-1] + ("0" if identifier[-1] != "0" else "1"),
        "source": "s" * 64,
    }
    assert "source" in refusal(post("install/upgrade", upgrade), 400)["message"]

    # Paging extremes: an OFFSET past 64 bits was a 500 from either database.
    for page in (2**31, 2**62, 10**20):
        assert "page" in refusal(get("install/tasks", page=page, page_size=256), 400)["message"]
        assert refusal(get("list", page=page, page_size=256), 400)
    assert get("install/tasks", page=2**31 - 1, page_size=256).json()["data"] == []
    for size in (0, 257, 10**9):
        assert "page_size" in refusal(get("install/tasks", page=1, page_size=size), 400)["message"]

    # Wrong types and oversized lists: 400 naming the field.
    assert refusal(post("install/identifiers", {**body, "source": "package", "metas": [1]}), 400)
    assert refusal(post("install/identifiers", {**body, "plugin_unique_identifiers": [1]}), 400)
    many = {"plugin_unique_identifiers": [identifier] * 65, "source": "package", "metas": [{}] * 65}
    assert "plugin_unique_identifiers" in refusal(post("install/identifiers", many), 400)["message"]
    assert refusal(post("installation/fetch/batch", {"plugin_ids": ["x"] * 257}), 400)
    assert refusal(post("installation/fetch/batch", {"plugin_ids": [None]}), 400)
    assert refusal(post("uninstall", {"plugin_installation_id": 5}), 400)
    assert httpx.get(f"{daemon.url}/health/check", timeout=10).status_code == 200
    assert "Traceback" not in daemon.log()


def test_another_tenant_cannot_reach_an_installation_or_its_tasks(
    daemon: Daemon, packages: dict[str, bytes]
) -> None:
    """Packages are content-addressed and shared; installations and tasks belong to one tenant."""
    a, b = Api(daemon, "tenant-a"), Api(daemon, "tenant-b")
    identifier = a.upload(packages["fastproto"])
    started = a.install(identifier)
    assert a.finished(started.task_id).status == "success"
    installation = a.installation_of(FASTPROTO)

    # B knows every id of A's: none of them answers or changes anything for B.
    with pytest.raises(Exception, match="404"):
        b.task(started.task_id)
    assert b.call("POST", f"install/tasks/{started.task_id}/delete") is True
    assert b.call("POST", f"install/tasks/{started.task_id}/delete/{identifier}") is True
    assert b.call("POST", "install/tasks/delete_all") is True
    assert b.uninstall(installation.id) is True
    assert b.call("POST", "installation/fetch/batch", json={"plugin_ids": [FASTPROTO]}) == []
    missing = b.call("POST", "installation/missing", json={"plugin_unique_identifiers": [identifier]})
    assert missing == [{"plugin_unique_identifier": identifier, "current_identifier": ""}]
    body = {
        "original_plugin_unique_identifier": identifier,
        "new_plugin_unique_identifier": identifier[:-1] + ("0" if identifier[-1] != "0" else "1"),
        "source": "package",
        "meta": {},
    }
    with pytest.raises(Exception, match="404"):
        b.call("POST", "install/upgrade", json=body)
    assert FASTPROTO not in [p.plugin_id for p in b.plugins()]
    with pytest.raises(Exception, match="not installed"):
        b.texts(count=1)

    # A's installation, task and service are untouched; the shared package B may install too.
    assert a.task(started.task_id).status == "success"
    assert a.installation_of(FASTPROTO).id == installation.id
    assert a.texts(count=1)
    b.installed(identifier)
    assert b.installation_of(FASTPROTO).id != installation.id


def test_a_database_locked_during_an_install_fails_it_with_a_reason_and_routes_answer_an_envelope(
    tmp_path: Path,
) -> None:
    """SQLite locked by another writer past its busy timeout, while an install waits for its
    plugin: the routes answer upstream's internal-error envelope meanwhile; the task is not left
    running, it fails naming the database; nothing is installed; installing again works."""
    (tmp_path / "plugins").mkdir()
    daemon = start_daemon(tmp_path / "plugins", tmp_path / "state", tmp_path / "daemon.log", **OPEN)
    try:
        api = Api(daemon, "tenant-a")
        slow = test_installs.variant(
            tmp_path, "fastproto", version="0.4.0", **{"fault.json": '{"start_delay_s": 3}'}
        )
        identifier = api.upload(build(slow, tmp_path / "slow.difypkg")[0].read_bytes())
        started = api.install(identifier)
        locker = sqlite3.connect(tmp_path / "state" / "state.sqlite3", timeout=30)
        locker.execute("BEGIN IMMEDIATE")  # the only writer until it ends: the install's writes wait
        try:
            locked = httpx.post(
                api.url("install/tasks/delete_all"), headers={"X-Api-Key": daemon.key}, timeout=60
            )
            assert "database is unavailable" in refusal(locked, 500)["message"]
            time.sleep(10)  # past the plugin's start (3 s) and the busy timeout (5 s) of its write
        finally:
            locker.rollback()
            locker.close()
        task = api.finished(started.task_id, limit=120)
        assert task.status == "failed", f"{task}\n{daemon.log()}"
        assert "database" in task.plugins[0].message
        assert FASTPROTO not in [p.plugin_id for p in api.plugins()]
        api.installed(identifier)
        assert api.installation_of(FASTPROTO).version == "0.4.0"
    finally:
        daemon.stop()


def test_a_tenant_cannot_pile_up_installs_in_progress(tmp_path: Path, packages: dict[str, bytes]) -> None:
    """Each plugin installing is a job polling its runtime: one tenant asking again and again
    for a plugin that is slow to start gets a 429 past the bound; other tenants are not held; the
    daemon still stops on SIGTERM with every one of those jobs waiting."""
    (tmp_path / "plugins").mkdir()
    daemon = start_daemon(tmp_path / "plugins", tmp_path / "state", tmp_path / "daemon.log", **OPEN)
    try:
        a, b = Api(daemon, "tenant-a"), Api(daemon, "tenant-b")
        slow = test_installs.variant(
            tmp_path, "fastproto", version="0.5.0", **{"fault.json": '{"start_delay_s": 120}'}
        )
        identifier = a.upload(build(slow, tmp_path / "slow.difypkg")[0].read_bytes())
        body = {"plugin_unique_identifiers": [identifier], "source": "package", "metas": [{}]}
        headers = {"X-Api-Key": daemon.key}
        answers = [
            httpx.post(a.url("install/identifiers"), headers=headers, json=body, timeout=60)
            for _ in range(70)
        ]
        accepted = [r for r in answers if r.status_code == 200]
        assert len(accepted) == 64, [r.text for r in answers if r.status_code != 200][:3]
        for refused in answers[64:]:
            assert "too many plugins installing" in refusal(refused, 429)["message"]
        fast = b.upload(packages["fastproto"])
        b.installed(fast)  # tenant-b's installs go on
        assert a.call("GET", "install/tasks", params={"page": 1, "page_size": 256})[0]["status"] == "running"
        # SIGTERM with those jobs waiting: cancelling them must not start tenant-b's runtime again
        # after the daemon stopped it (the daemon then never exited).
        daemon.stop()
    finally:
        daemon.stop()


def test_an_install_whose_uv_hangs_fails_at_the_timeout_and_leaves_no_process(tmp_path: Path) -> None:
    """A package whose requirements point at an index that accepts and never answers: the task
    fails at PLUGIN_INSTALL_TIMEOUT naming it, uv is killed and the runtime is removed."""
    index = socket.create_server(("127.0.0.1", 0), backlog=16)  # accepts (the kernel), never answers
    (tmp_path / "plugins").mkdir()
    daemon = start_daemon(
        tmp_path / "plugins",
        tmp_path / "state",
        tmp_path / "daemon.log",
        plugin_install_timeout="0.1",
        **OPEN,
    )
    try:
        api = Api(daemon, "tenant-a")
        requirements = f"--index-url http://127.0.0.1:{index.getsockname()[1]}/simple\nsix==1.16.0\n"
        hung = test_installs.variant(
            tmp_path, "fastproto", version="0.6.0", **{"requirements.txt": requirements}
        )
        identifier = api.upload(build(hung, tmp_path / "hung.difypkg")[0].read_bytes())
        task = api.finished(api.install(identifier).task_id, limit=120)
        assert task.status == "failed" and "PLUGIN_INSTALL_TIMEOUT" in task.plugins[0].message
        test_installs.gone(daemon, identifier)
        assert not [
            p.pid
            for p in psutil.process_iter(["cmdline"])
            if any(str(tmp_path) in part for part in p.info["cmdline"] or []) and p.pid != daemon.proc.pid
        ], "a process of the hung install is left"
        assert FASTPROTO not in [p.plugin_id for p in api.plugins()]
    finally:
        daemon.stop()
        index.close()
