"""Endpoints of plugins a tenant installed through the API: ``demo/echo_endpoints`` packaged
with ``plugin-daemon package``, installed through ``install/identifiers``, its endpoints set up,
counted in ``management/list`` and called through ``/e/{hook_id}/...``; uninstalled, its
endpoints go with it, as upstream removes them. Real daemon processes, real HTTP, and a real
PostgreSQL server for two daemons sharing one database."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from daemon.testing import PLUGINS, Daemon, start_daemon
from tests import dify_entities as dify
from tests.postgres import PostgresServer
from tests.test_endpoints import PLUGIN, call, error_of, hook, listing
from tests.test_installs import OPEN, Api

# What upstream answers for a hook it does not know (``internal/server/endpoint.go``).
NOT_FOUND = {
    "code": -400,
    "data": None,
    "message": "endpoint not found",
    "error_type": "PluginDaemonBadRequestError",
    "args": None,
}


@pytest.fixture(scope="module")
def package(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    """The bundled endpoint plugin as an operator packages it."""
    out = tmp_path_factory.mktemp("difypkg") / "echo_endpoints.difypkg"
    command = [sys.executable, "-m", "daemon", "package", str(PLUGINS / "echo_endpoints"), "-o", str(out)]
    subprocess.run(command, check=True, capture_output=True, timeout=120)
    return out.read_bytes()


@pytest.fixture
def client() -> Iterator[httpx.Client]:
    with httpx.Client(timeout=60) as c:
        yield c


def start(tmp: Path, name: str, **env: str) -> Daemon:
    """A daemon with an empty plugins directory: it serves only what tenants install."""
    (tmp / f"plugins-{name}").mkdir()
    return start_daemon(tmp / f"plugins-{name}", tmp / f"state-{name}", tmp / f"{name}.log", **OPEN, **env)


def setup(
    daemon: Daemon, client: httpx.Client, tenant: str, identifier: str, name: str, greeting: str
) -> None:
    body = {
        "user_id": "u1",
        "plugin_unique_identifier": identifier,
        "settings": {"greeting": greeting},
        "name": name,
    }
    assert call(daemon, client, "POST", tenant, "setup", json=body) is True


def counts(api: Api) -> tuple[int, int]:
    """``endpoints_setups`` and ``endpoints_active`` of the endpoint plugin, as Dify reads them,
    in ``management/list`` and in ``installation/fetch/batch`` (which must agree)."""
    listed = api.installation_of(PLUGIN)
    batch = api.call("POST", "installation/fetch/batch", json={"plugin_ids": [PLUGIN]})
    fetched = dify.PluginInstallation.model_validate(batch[0])
    found = listed.endpoints_setups, listed.endpoints_active
    assert (fetched.endpoints_setups, fetched.endpoints_active) == found
    return found


def test_an_installed_plugins_endpoints_serve_are_counted_and_go_with_its_uninstall(
    package: bytes, tmp_path: Path, client: httpx.Client
) -> None:
    daemon = start(tmp_path, "one")
    try:
        api = Api(daemon, "tenant-a")
        identifier = api.upload(package)
        api.installed(identifier)
        assert counts(api) == (0, 0)

        setup(daemon, client, "tenant-a", identifier, "first", "hello")
        setup(daemon, client, "tenant-a", identifier, "second", "bye")
        first, second = sorted(listing(daemon, client, "tenant-a", PLUGIN), key=lambda e: e.name)
        assert first.declaration.settings  # the declaration of the installed package
        r = client.post(hook(daemon, first, "/echo?x=1"), content=b"ping")
        assert r.status_code == 200, r.text
        assert r.json()["greeting"] == "hello"
        assert counts(api) == (2, 2)
        assert call(daemon, client, "POST", "tenant-a", "disable", json={"endpoint_id": second.id}) is True
        assert counts(api) == (2, 1)
        assert not [p for p in Api(daemon, "tenant-b").plugins() if p.plugin_id == PLUGIN]

        assert api.uninstall(api.installation_of(PLUGIN).id) is True
        r = client.get(hook(daemon, first, "/echo"))
        assert r.status_code == 404
        assert error_of(r) == NOT_FOUND
        assert listing(daemon, client, "tenant-a") == []  # removed with the installation
    finally:
        daemon.stop()


def test_an_endpoint_set_up_through_one_daemon_serves_through_another_at_once(
    package: bytes, postgres: PostgresServer, tmp_path: Path, client: httpx.Client
) -> None:
    """Two daemons on one PostgreSQL, neither reconciling on its own for an hour: the second
    learns of an installation made through the first from the endpoint request itself."""
    env = postgres.env(postgres.create_database())
    one, two = (start(tmp_path, name, plugin_installations_reconcile_interval="3600", **env) for name in "ab")
    try:
        a1 = Api(one, "tenant-a")
        identifier = a1.upload(package)
        for tenant in ("tenant-a", "tenant-b", "tenant-c"):
            Api(one, tenant).installed(identifier)

        # /e/: set up and installed through the first, called through the second.
        setup(one, client, "tenant-a", identifier, "hook", "from one")
        (first,) = listing(one, client, "tenant-a")
        r = client.get(hook(two, first, "/echo"))
        assert r.status_code == 200, f"{r.text}\n{two.log()}"
        assert r.json()["greeting"] == "from one"

        # endpoint/setup through the second, for the plugin installed through the first.
        setup(two, client, "tenant-b", identifier, "set up", "from two")
        (second,) = listing(one, client, "tenant-b")
        assert client.get(hook(one, second, "/echo")).json()["greeting"] == "from two"

        # endpoint/list and update through the second: the installed plugin's declaration.
        setup(one, client, "tenant-c", identifier, "listed", "from one")
        (listed,) = listing(two, client, "tenant-c", PLUGIN)
        assert listed.declaration.endpoints and listed.settings == {"greeting": "from one"}
        update = {"endpoint_id": listed.id, "user_id": "u1", "name": "listed", "settings": {"greeting": "c"}}
        assert call(two, client, "POST", "tenant-c", "update", json=update) is True
        assert client.get(hook(one, listed, "/echo")).json()["greeting"] == "c"
        assert counts(Api(two, "tenant-c")) == (1, 1)

        # Uninstalled through the second: its endpoints are gone on both; other tenants' stay.
        a2 = Api(two, "tenant-a")
        assert a2.uninstall(a2.installation_of(PLUGIN).id) is True
        r = client.get(hook(one, first, "/echo"))
        assert r.status_code == 404 and error_of(r) == NOT_FOUND
        assert listing(one, client, "tenant-a") == []
        assert client.get(hook(one, second, "/echo")).json()["greeting"] == "from two"
    finally:
        one.stop()
        two.stop()
