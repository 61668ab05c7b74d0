"""Plugins installed per tenant through the API, as Dify's API server installs them: real daemon
processes, the bundled plugins packaged as ``.difypkg``, every answer parsed as Dify parses it."""

from __future__ import annotations

import contextlib
import json
import re
import shutil
import sqlite3
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest

from daemon.packages import build
from daemon.testing import PLUGINS, REPO, Daemon, alive, parse_sse, start_daemon
from tests import dify_client
from tests import dify_entities as dify
from tests.postgres import PostgresServer
from tests.test_management import datasource_providers, trigger_providers

FASTPROTO = "demo/fastproto"
NOTES = "demo/notes"
OPEN = {"force_verifying_signature": "false"}  # signatures are checked elsewhere
NOT_INSTALLED = "is not installed.*PluginNotFoundError.*-404"  # as Dify's stream reader words it


def variant(tmp: Path, name: str, *, version: str | None = None, upper: bool = False, **files: str) -> Path:
    """A copy of a bundled plugin: another version, uppercase output (``upper``), extra files."""
    root = tmp / f"{name}-{version or 'x'}-{'u' if upper else 'l'}-{len(files)}"
    shutil.copytree(PLUGINS / name, root, ignore=shutil.ignore_patterns(".venv", "__pycache__"))
    if version is not None:
        manifest = root / "manifest.yaml"
        manifest.write_text(
            re.sub(r"(?m)^version: .*$", f"version: {version}", manifest.read_text(), count=1)
        )
    if upper:  # fastproto pads its texts with this pattern: a v2 that answers in capitals
        emit = root / "tools" / "emit.py"
        emit.write_text(
            emit.read_text().replace('"abcdefghijklmnopqrstuvwxyz"', '"ABCDEFGHIJKLMNOPQRSTUVWXYZ"')
        )
    for relative, text in files.items():
        (root / relative).write_text(text)
    return root


@pytest.fixture(scope="module")
def packages(tmp_path_factory: pytest.TempPathFactory) -> dict[str, bytes]:
    tmp = tmp_path_factory.mktemp("difypkg")
    folders = {
        "fastproto": PLUGINS / "fastproto",
        "fastproto-v2": variant(tmp, "fastproto", version="0.2.0", upper=True),
        "notes": PLUGINS / "notes",
        "broken": variant(tmp, "fastproto", version="0.3.0", **{"fault.json": '{"exit_during_start": 7}'}),
    }
    return {name: build(folder, tmp / f"{name}.difypkg")[0].read_bytes() for name, folder in folders.items()}


class Api:
    """Dify's ``PluginInstaller`` calls (``api/core/plugin/impl/plugin.py``), through one daemon."""

    def __init__(self, daemon: Daemon, tenant: str) -> None:
        self.daemon = daemon
        self.tenant = tenant
        self.client = httpx.Client(timeout=120)

    def url(self, route: str) -> str:
        return f"{self.daemon.url}/plugin/{self.tenant}/management/{route}"

    def call(self, method: str, route: str, **kwargs: Any) -> Any:
        """As ``_request_with_plugin_daemon_response``: raises what Dify raises on an error."""
        headers = {"X-Api-Key": self.daemon.key}
        if "json" in kwargs:
            headers["Content-Type"] = "application/json"
            kwargs["content"] = json.dumps(kwargs.pop("json"))
        return dify_client.request(self.client, method, self.url(route), headers, **kwargs)

    def upload(self, data: bytes) -> str:
        files = {"dify_pkg": ("dify_pkg", data, "application/octet-stream")}
        answer = self.call("POST", "install/upload/package", files=files, data={"verify_signature": "false"})
        return dify.PluginDecodeResponse.model_validate(answer).unique_identifier

    def install(self, *identifiers: str) -> dify.PluginInstallTaskStartResponse:
        body = {
            "plugin_unique_identifiers": list(identifiers),
            "source": "package",
            "metas": [{}] * len(identifiers),
        }
        return dify.PluginInstallTaskStartResponse.model_validate(
            self.call("POST", "install/identifiers", json=body)
        )

    def task(self, task_id: str) -> dify.PluginInstallTask:
        return dify.PluginInstallTask.model_validate(self.call("GET", f"install/tasks/{task_id}"))

    def finished(self, task_id: str, limit: float = 300) -> dify.PluginInstallTask:
        """Poll the task as Dify's console does until it is no longer running (bounded)."""
        deadline = time.monotonic() + limit
        while True:
            task = self.task(task_id)
            if task.status not in ("pending", "running"):
                return task
            assert time.monotonic() < deadline, f"task still running: {task}\n{self.daemon.log()}"
            time.sleep(0.1)

    def installed(self, *identifiers: str) -> None:
        started = self.install(*identifiers)
        if not started.all_installed:
            task = self.finished(started.task_id)
            assert task.status == "success", f"{task}\n{self.daemon.log()}"

    def upgrade(self, original: str, new: str) -> dify.PluginInstallTaskStartResponse:
        body = {
            "original_plugin_unique_identifier": original,
            "new_plugin_unique_identifier": new,
            "source": "package",
            "meta": {},
        }
        return dify.PluginInstallTaskStartResponse.model_validate(
            self.call("POST", "install/upgrade", json=body)
        )

    def plugins(self) -> list[dify.PluginEntity]:
        answer = self.call("GET", "list", params={"page": 1, "page_size": 256, "response_type": "paged"})
        return dify.PluginListResponse.model_validate(answer).list

    def uninstall(self, installation_id: str) -> bool:
        return self.call("POST", "uninstall", json={"plugin_installation_id": installation_id})

    def installation_of(self, plugin_id: str) -> dify.PluginEntity:
        return next(p for p in self.plugins() if p.plugin_id == plugin_id)

    def invoke(self, plugin_id: str, provider: str, tool: str, params: dict[str, Any]) -> list[Any]:
        """``dispatch/tool/invoke`` read as Dify reads the stream."""
        headers = self.daemon.headers(plugin_id)
        body = {"user_id": "u1", "data": {"provider": provider, "tool": tool, "tool_parameters": params}}
        url = f"{self.daemon.url}/plugin/{self.tenant}/dispatch/tool/invoke"
        return dify_client.dispatch(self.client, url, headers, body)

    def texts(self, **params: Any) -> list[str]:
        """fastproto's ``emit`` texts."""
        return [
            m["message"]["text"]
            for m in self.invoke(FASTPROTO, "fastproto", "emit", params)
            if m["type"] == "text"
        ]


def runtimes(daemon: Daemon) -> dict[str, dict[str, Any]]:
    """The installed runtimes ``GET /plugins`` shows, by unique identifier."""
    r = httpx.get(f"{daemon.url}/plugins", headers={"X-Api-Key": daemon.key}, timeout=30)
    return {p["unique_identifier"]: p for p in r.json()["plugins"] if "unique_identifier" in p}


def pids(daemon: Daemon, identifier: str) -> list[int]:
    return [i["pid"] for i in runtimes(daemon)[identifier]["instances"] if i["state"] == "ready"]


def gone(daemon: Daemon, identifier: str, limit: float = 60) -> None:
    """Wait (bounded) until ``identifier``'s runtime is no longer on the daemon."""
    deadline = time.monotonic() + limit
    while identifier in runtimes(daemon):
        assert time.monotonic() < deadline, f"{identifier} still running:\n{daemon.log()}"
        time.sleep(0.1)


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[Daemon]:
    """A daemon with an empty plugins directory: every plugin it serves is installed through the API."""
    (tmp_path / "plugins").mkdir()
    started = start_daemon(tmp_path / "plugins", tmp_path / "state", tmp_path / "daemon.log", **OPEN)
    yield started
    started.stop()


def test_dify_installs_lists_invokes_and_uninstalls_a_packaged_sdk_plugin(
    daemon: Daemon, packages: dict[str, bytes], tmp_path: Path
) -> None:
    api = Api(daemon, "tenant-a")
    identifier = api.upload(packages["notes"])
    assert api.plugins() == []
    started = api.install(identifier)
    assert not started.all_installed and started.task_id
    task = api.finished(started.task_id)
    assert task.status == "success" and task.total_plugins == task.completed_plugins == 1
    assert task.plugins[0].plugin_unique_identifier == identifier and task.plugins[0].message == "installed"

    (entry,) = api.plugins()
    assert entry.plugin_unique_identifier == identifier and entry.source == "package"
    assert entry.installation_id == entry.id and entry.declaration.tool is not None
    tools = api.call("GET", "tools", params={"page": 1, "page_size": 256})
    for tool in tools[0]["declaration"]["tools"]:  # what Dify's transformer adds before parsing
        tool["identity"]["provider"] = tools[0]["declaration"]["identity"]["name"]
    (provider,) = [dify.PluginToolProviderEntity.model_validate(t) for t in tools]
    assert provider.plugin_unique_identifier == identifier
    assert api.call("GET", "installation/ids", params={"category": "tool"}) == {"plugin_ids": [NOTES]}
    batch = api.call("POST", "installation/fetch/batch", json={"plugin_ids": [NOTES, "demo/other"]})
    assert [dify.PluginInstallation.model_validate(b).id for b in batch] == [entry.id]
    newer = identifier.replace(":0.1.0@", ":0.2.0@")
    missing = api.call(
        "POST", "installation/missing", json={"plugin_unique_identifiers": [identifier, newer]}
    )
    assert [dify.MissingPluginDependency.model_validate(m).current_identifier for m in missing] == [
        identifier
    ]
    assert api.install(identifier).all_installed  # a plugin id the tenant has: nothing to do

    saved = api.invoke(NOTES, "notes", "save_note", {"title": "t", "body": "kept in the database"})
    assert saved and all(m["type"] in ("text", "json", "variable") for m in saved)
    read = api.invoke(NOTES, "notes", "read_note", {"title": "t"})
    assert "kept in the database" in json.dumps(read)
    other = Api(daemon, "tenant-b")  # installed for tenant-a only
    with pytest.raises(ValueError, match=NOT_INSTALLED):
        other.invoke(NOTES, "notes", "read_note", {"title": "t"})

    (pid,) = pids(daemon, identifier)
    folder = next((tmp_path / "state" / "runtimes").rglob("manifest.yaml")).parent
    assert api.uninstall(entry.id) is True
    assert api.plugins() == []
    with pytest.raises(ValueError, match=NOT_INSTALLED):
        api.invoke(NOTES, "notes", "read_note", {"title": "t"})
    gone(daemon, identifier)
    assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    assert not folder.exists()
    assert api.uninstall(entry.id) is True  # already uninstalled: upstream answers true


def test_installed_datasource_and_trigger_plugins_are_listed_for_their_tenant(
    daemon: Daemon, tmp_path: Path
) -> None:
    """Packaged datasource and trigger plugins (``tests/plugins``) installed for one tenant: its
    ``datasources`` and ``triggers`` list them under their package identifiers, as Dify reads them."""
    api = Api(daemon, "tenant-a")
    built = {
        name: build(REPO / "tests" / "plugins" / name, tmp_path / f"{name}.difypkg")[0].read_bytes()
        for name in ("web_pages", "webhook_events")
    }
    identifiers = {name: api.upload(data) for name, data in built.items()}
    api.installed(*identifiers.values())

    (datasource,) = datasource_providers(daemon, api.client, "tenant-a")
    assert (datasource.plugin_id, datasource.provider) == ("demo/web_pages", "web_pages")
    assert datasource.plugin_unique_identifier == identifiers["web_pages"]
    assert [d.identity.name for d in datasource.declaration.datasources] == ["crawl"]
    (trigger,) = trigger_providers(daemon, api.client, "tenant-a")
    assert (trigger.plugin_id, trigger.provider) == ("demo/webhook_events", "webhook_events")
    assert trigger.plugin_unique_identifier == identifiers["webhook_events"]
    assert [e.identity.name for e in trigger.declaration.events] == ["received"]
    one = api.call(
        "GET", "trigger", params={"plugin_id": "demo/webhook_events", "provider": "webhook_events"}
    )
    assert one["plugin_unique_identifier"] == identifiers["webhook_events"] and one["tenant_id"] == "tenant-a"
    assert datasource_providers(daemon, api.client, "tenant-b") == []
    assert trigger_providers(daemon, api.client, "tenant-b") == []


def test_two_tenants_share_one_runtime_and_an_uninstall_keeps_it_for_the_other(
    daemon: Daemon, packages: dict[str, bytes], tmp_path: Path
) -> None:
    a, b = Api(daemon, "tenant-a"), Api(daemon, "tenant-b")
    identifier = a.upload(packages["fastproto"])
    a.installed(identifier)
    b.installed(identifier)
    shown = runtimes(daemon)
    assert list(shown) == [identifier] and shown[identifier]["tenants"] == 2
    (pid,) = pids(daemon, identifier)
    assert a.texts(count=1, size=5) == b.texts(count=1, size=5) == ["abcde"]

    assert a.uninstall(a.installation_of(FASTPROTO).id) is True
    with pytest.raises(ValueError, match=NOT_INSTALLED):
        a.texts(count=1)
    assert b.texts(count=2, size=3) == ["abc", "abc"]
    assert pids(daemon, identifier) == [pid] and runtimes(daemon)[identifier]["tenants"] == 1

    # A restart serves the installation again from the folder already extracted.
    daemon.stop()
    again = start_daemon(tmp_path / "plugins", tmp_path / "state", tmp_path / "daemon2.log", **OPEN)
    try:
        b2 = Api(again, "tenant-b")
        assert b2.texts(count=1, size=4) == ["abcd"]
        assert "installing with" not in again.log()
        assert b2.uninstall(b2.installation_of(FASTPROTO).id) is True
        gone(again, identifier)
    finally:
        again.stop()


def test_an_upgrade_runs_both_versions_until_the_old_ones_sessions_end(
    daemon: Daemon, packages: dict[str, bytes]
) -> None:
    api = Api(daemon, "tenant-a")
    v1, v2 = api.upload(packages["fastproto"]), api.upload(packages["fastproto-v2"])
    api.installed(v1)
    before = api.installation_of(FASTPROTO)

    slow: list[str] = []
    streaming = threading.Event()

    def long_session() -> None:  # 30 texts, 0.1 s apart, on v1
        url = f"{daemon.url}/plugin/tenant-a/dispatch/tool/invoke"
        body = daemon.invoke_body("fastproto", "emit", {"count": 30, "size": 4, "delay_ms": 100})
        with httpx.stream("POST", url, headers=daemon.headers(FASTPROTO), json=body, timeout=120) as r:
            for line in r.iter_lines():
                if line.startswith("data: "):
                    streaming.set()
                    slow.append(line)

    reader = threading.Thread(target=long_session)
    reader.start()
    assert streaming.wait(60)
    started = api.upgrade(v1, v2)
    task = api.finished(started.task_id)
    assert task.status == "success" and task.plugins[0].message == "upgraded"
    assert set(runtimes(daemon)) == {v1, v2}  # side by side while the old session streams
    assert api.texts(count=1, size=4) == ["ABCD"]  # new sessions reach the new version
    reader.join(120)
    events = parse_sse("\n\n".join(slow).encode() + b"\n\n")
    texts = [e.message["message"]["text"] for e in events if e.ok and e.message["type"] == "text"]
    assert texts == ["abcd"] * 30 and all(e.ok for e in events)  # the old one finished whole
    gone(daemon, v1)
    after = api.installation_of(FASTPROTO)
    assert after.id == before.id and after.plugin_unique_identifier == v2 and after.version == "0.2.0"


def test_a_failed_install_shows_its_reason_and_installs_nothing(
    daemon: Daemon, packages: dict[str, bytes]
) -> None:
    api = Api(daemon, "tenant-a")
    identifier = api.upload(packages["broken"])
    task = api.finished(api.install(identifier).task_id)
    assert task.status == "failed" and task.completed_plugins == 0
    (plugin,) = task.plugins
    assert plugin.status == "failed"
    assert "exiting during start-up with code 7" in plugin.message, plugin.message
    assert api.plugins() == []
    gone(daemon, identifier)
    tasks = api.call("GET", "install/tasks", params={"page": 1, "page_size": 10})
    assert [dify.PluginInstallTask.model_validate(t).id for t in tasks] == [task.id]


def refusal(response: httpx.Response, status: int) -> dict[str, Any]:
    """Upstream's error envelope: ``code`` and a JSON ``message`` naming the error type."""
    assert response.status_code == status, response.text
    body = response.json()
    assert body["code"] == (-500 if status >= 500 else -status) and body["data"] is None
    return json.loads(body["message"])


def test_bad_requests_are_refused_with_upstreams_envelope(daemon: Daemon, packages: dict[str, bytes]) -> None:
    api = Api(daemon, "tenant-a")
    identifier = api.upload(packages["fastproto"])
    unknown = "demo/fastproto:9.9.9@" + "0" * 64
    headers = {"X-Api-Key": daemon.key}

    def post(route: str, body: Any, **extra: str) -> httpx.Response:
        return httpx.post(api.url(route), headers={**headers, **extra}, json=body, timeout=30)

    valid = {"plugin_unique_identifiers": [identifier], "source": "package", "metas": [{}]}
    error = refusal(post("install/identifiers", {**valid, "plugin_unique_identifiers": [unknown]}), 404)
    assert error["error_type"] == "PluginDaemonNotFoundError" and "upload it first" in error["message"]
    error = refusal(post("install/identifiers", {**valid, "plugin_unique_identifiers": ["../etc"]}), 400)
    assert (
        error["error_type"] == "PluginDaemonBadRequestError"
        and "plugin_unique_identifiers.0" in error["message"]
    )
    assert (
        "source"
        in refusal(post("install/identifiers", {"plugin_unique_identifiers": [identifier]}), 400)["message"]
    )
    assert "metas" in refusal(post("install/identifiers", {**valid, "metas": [{}, {}]}), 400)["message"]
    assert "JSON object" in refusal(post("install/identifiers", [identifier]), 400)["message"]
    assert refusal(post("install/identifiers", valid, **{"X-Api-Key": "wrong"}), 401)
    raw = httpx.post(api.url("install/identifiers"), headers=headers, content=b"{", timeout=30)
    assert refusal(raw, 415)  # not sent as JSON

    missing_task = httpx.get(api.url("install/tasks/no-such-task"), headers=headers, timeout=30)
    assert refusal(missing_task, 404)["error_type"] == "PluginDaemonNotFoundError"
    assert (
        "page_size"
        in refusal(httpx.get(api.url("install/tasks"), headers=headers, params={"page": 1}), 400)["message"]
    )

    def upgrade(original: str, new: str) -> httpx.Response:
        body = {"original_plugin_unique_identifier": original, "new_plugin_unique_identifier": new}
        return post("install/upgrade", {**body, "source": "package"})

    assert "same" in refusal(upgrade(identifier, identifier), 400)["message"]
    assert "different" in refusal(upgrade(identifier, "demo/other:0.1.0@" + "1" * 64), 400)["message"]
    assert "not found for this tenant" in refusal(upgrade(identifier, unknown), 404)["message"]
    assert "plugin_installation_id" in refusal(post("uninstall", {}), 400)["message"]
    assert post("uninstall", {"plugin_installation_id": "never-installed"}).json()["data"] is True
    assert "plugin_ids" in refusal(post("installation/fetch/batch", {"plugin_ids": "x"}), 400)["message"]
    assert refusal(post("installation/missing", {"plugin_unique_identifiers": ["nope"]}), 400)
    bad_item = post(f"install/tasks/x/delete/{'not-an-identifier'}", None)
    assert "not a plugin unique identifier" in refusal(bad_item, 400)["message"]
    # Dify's decode/from_identifier is a GET with a JSON body; fetch/identifier answers a bool.
    body = {"plugin_unique_identifier": identifier}
    decoded = httpx.request("GET", api.url("decode/from_identifier"), headers=headers, json=body)
    assert dify.PluginDecodeResponse.model_validate(decoded.json()["data"]).unique_identifier == identifier
    assert api.call("GET", "fetch/identifier", params={"plugin_unique_identifier": identifier}) is True
    assert api.call("GET", "fetch/identifier", params={"plugin_unique_identifier": unknown}) is False
    assert httpx.get(f"{daemon.url}/health/check", timeout=10).status_code == 200


def test_tasks_are_listed_newest_first_and_deleted_as_upstream_deletes_them(
    daemon: Daemon, packages: dict[str, bytes]
) -> None:
    api = Api(daemon, "tenant-a")
    broken, good = api.upload(packages["broken"]), api.upload(packages["fastproto"])
    first = api.finished(api.install(broken).task_id)
    second = api.finished(api.install(good).task_id)
    assert first.status == "failed" and second.status == "success"
    listed = api.call("GET", "install/tasks", params={"page": 1, "page_size": 10})
    assert [t["id"] for t in listed] == [second.id, first.id]
    assert [t["id"] for t in api.call("GET", "install/tasks", params={"page": 2, "page_size": 1})] == [
        first.id
    ]
    assert Api(daemon, "tenant-b").call("GET", "install/tasks", params={"page": 1, "page_size": 10}) == []

    # Dropping the failed plugin leaves a task of successes only, which goes (upstream's rule).
    assert api.call("POST", f"install/tasks/{first.id}/delete/{broken}") is True
    assert [t["id"] for t in api.call("GET", "install/tasks", params={"page": 1, "page_size": 10})] == [
        second.id
    ]
    assert api.call("POST", f"install/tasks/{second.id}/delete") is True
    with pytest.raises(dify_client.PluginDaemonClientSideError, match="404"):
        api.task(second.id)
    # The tenant has demo/fastproto (at 0.1.0): installing another version of it is no task (upstream).
    assert api.install(broken).all_installed
    assert api.uninstall(api.installation_of(FASTPROTO).id) is True
    api.finished(api.install(broken).task_id)
    assert api.call("POST", "install/tasks/delete_all") is True
    assert api.call("GET", "install/tasks", params={"page": 1, "page_size": 10}) == []


def test_two_daemons_on_one_postgresql_install_through_one_and_serve_through_the_other(
    packages: dict[str, bytes], postgres: PostgresServer, tmp_path: Path
) -> None:
    """Installations, tasks, packages and plugin storage live in PostgreSQL: either daemon serves
    what was installed through the other, and one dying mid-stream leaves the other serving."""
    env = postgres.env(postgres.create_database())
    daemons: list[Daemon] = []
    for n, interval in enumerate(("2", "3600")):  # the second learns only on a miss or a route's read
        (tmp_path / f"plugins{n}").mkdir()
        daemons.append(
            start_daemon(
                tmp_path / f"plugins{n}",
                tmp_path / f"state{n}",
                tmp_path / f"daemon{n}.log",
                plugin_installations_reconcile_interval=interval,
                **OPEN,
                **env,
            )
        )
    one, two = daemons
    try:
        a1, a2 = Api(one, "tenant-a"), Api(two, "tenant-a")
        notes, fast = a1.upload(packages["notes"]), a1.upload(packages["fastproto"])
        started = a1.install(notes, fast)
        assert a2.finished(started.task_id).status == "success"  # the task is read through the other

        # Storage: saved through one daemon's runtime, read and deleted through the other's. The
        # second learns of the installation from this very request (its reconcile is an hour away).
        a2.invoke(NOTES, "notes", "save_note", {"title": "plan", "body": "buy milk"})
        assert {p.plugin_unique_identifier for p in a2.plugins()} == {notes, fast}
        assert "buy milk" in json.dumps(a1.invoke(NOTES, "notes", "read_note", {"title": "plan"}))
        a1.invoke(NOTES, "notes", "delete_note", {"title": "plan"})
        assert '"found", "variable_value": false' in json.dumps(
            a2.invoke(NOTES, "notes", "read_note", {"title": "plan"})
        )
        assert set(runtimes(one)) == set(runtimes(two)) == {notes, fast}
        assert a1.texts(count=1, size=1) == a2.texts(count=1, size=1) == ["a"]
        assert pids(one, fast) and pids(two, fast)
        assert not set(pids(one, fast)) & set(pids(two, fast))  # each daemon runs its own

        # Installed through the second, seen by the first's reconcile loop (no request to it).
        Api(two, "tenant-b").installed(fast)
        deadline = time.monotonic() + 60
        while runtimes(one)[fast]["tenants"] != 2:
            assert time.monotonic() < deadline, one.log()
            time.sleep(0.1)

        # The first dies in the middle of a stream; the second goes on serving.
        one.record_children()
        url = f"{one.url}/plugin/tenant-a/dispatch/tool/invoke"
        body = one.invoke_body("fastproto", "emit", {"count": 200, "size": 4, "delay_ms": 50})
        received = 0
        cut = pytest.raises(httpx.HTTPError)  # the stream is cut, not ended
        with cut, httpx.stream("POST", url, headers=one.headers(FASTPROTO), json=body, timeout=60) as r:
            for line in r.iter_lines():
                received += line.startswith("data: ")
                if received == 3:
                    one.proc.kill()
        assert 3 <= received < 200
        one.proc.wait(30)
        for _ in range(3):
            assert a2.texts(count=2, size=3) == ["abc", "abc"]
        assert "buy" not in json.dumps(a2.invoke(NOTES, "notes", "read_note", {"title": "plan"}))
        assert a2.uninstall(a2.installation_of(FASTPROTO).id) is True
        assert Api(two, "tenant-b").texts(count=1, size=2) == ["ab"]  # tenant-b keeps it
    finally:
        for daemon in daemons:
            if daemon.proc.poll() is not None:  # killed: its plugins exit once orphaned; make sure
                for pid in alive(daemon.children_seen):
                    with contextlib.suppress(psutil.Error):
                        psutil.Process(pid).kill()
            else:
                daemon.stop()


def test_an_uninstall_lets_its_sessions_finish_and_installing_again_meanwhile_keeps_the_runtime(
    daemon: Daemon, packages: dict[str, bytes]
) -> None:
    api = Api(daemon, "tenant-a")
    identifier = api.upload(packages["fastproto"])
    api.installed(identifier)
    (pid,) = pids(daemon, identifier)
    url = f"{daemon.url}/plugin/tenant-a/dispatch/tool/invoke"
    body = daemon.invoke_body("fastproto", "emit", {"count": 20, "size": 2, "delay_ms": 100})
    texts: list[str] = []
    with httpx.stream("POST", url, headers=daemon.headers(FASTPROTO), json=body, timeout=120) as r:
        for line in r.iter_lines():
            if not line.startswith("data: "):
                continue
            event = json.loads(line[len("data: ") :])
            assert event["code"] == 0, event
            texts += [event["data"]["message"]["text"]] if event["data"]["type"] == "text" else []
            if len(texts) == 2:
                assert api.uninstall(api.installation_of(FASTPROTO).id) is True
                assert runtimes(daemon)[identifier]["draining"] is True  # still serving this session
                api.installed(identifier)  # back before it stopped
    assert texts == ["ab"] * 20
    assert runtimes(daemon)[identifier]["draining"] is False and pids(daemon, identifier) == [pid]
    assert api.texts(count=1, size=1) == ["a"]


def test_a_package_altered_in_the_database_is_refused_when_extracted(
    packages: dict[str, bytes], tmp_path: Path
) -> None:
    """A daemon extracts an installed package again from its bytes and checks them against the
    identifier: bytes swapped in the database are not run."""
    (tmp_path / "plugins").mkdir()
    first = start_daemon(tmp_path / "plugins", tmp_path / "state", tmp_path / "one.log", **OPEN)
    try:
        api = Api(first, "tenant-a")
        v1, v2 = api.upload(packages["fastproto"]), api.upload(packages["fastproto-v2"])
        api.installed(v1)
    finally:
        first.stop()
    shutil.rmtree(tmp_path / "state" / "runtimes")
    with sqlite3.connect(tmp_path / "state" / "state.sqlite3") as db:
        db.execute(
            "UPDATE plugin_packages SET package ="
            " (SELECT package FROM plugin_packages WHERE unique_identifier = ?) WHERE unique_identifier = ?",
            (v2, v1),
        )
    again = start_daemon(tmp_path / "plugins", tmp_path / "state", tmp_path / "two.log", **OPEN)
    try:
        r = httpx.post(again.invoke_url("tenant-a"), **again.invocation(FASTPROTO, "emit"), timeout=60)
        error = refusal(r, 503)
        assert error["error_type"] == "PluginDaemonInternalServerError"
        assert f"the package kept as {v1} decodes as {v2}" in error["message"]
        assert not (tmp_path / "state" / "runtimes" / "demo" / "fastproto" / v1.partition(":")[2]).exists()
    finally:
        again.stop()
