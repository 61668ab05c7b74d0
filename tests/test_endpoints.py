"""Plugin endpoints through real plugin processes and real HTTP: the ``endpoint/*`` routes read
as Dify's API server reads them (``tests/dify_client.py``, parsed with Dify's own entity in
``tests/dify_entities.py``), and the public ``/e/{hook_id}/...`` route called as any HTTP
client would, answered by the bundled ``demo/echo_endpoints`` plugin on the official SDK."""

from __future__ import annotations

import json
import os
import signal
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from pydantic import TypeAdapter

from daemon.testing import Daemon, copy_plugin, free_port, start_daemon
from tests import dify_client as dify
from tests import dify_entities
from tests.postgres import PostgresServer
from tests.test_remote_debugging import debugging_key, listed
from tests.test_runtime import wait_for

PLUGIN = "demo/echo_endpoints"
CRASHY = "demo/echo_endpoints_crashy"
BODY_LIMIT = 64 * 1024
EXECUTION_TIMEOUT = 8  # PLUGIN_MAX_EXECUTION_TIMEOUT of the module's daemon
Listing = TypeAdapter(list[dify_entities.EndpointEntityWithInstance])


@pytest.fixture(scope="module")
def daemon(sdk_plugins_installed: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    tmp = tmp_path_factory.mktemp("endpoints")
    plugins = tmp / "plugins"
    plugins.mkdir()
    for name in ("echo_endpoints", "text_toolkit"):
        copy_plugin(name, plugins)
    copy_plugin("echo_endpoints", plugins, {"crash_after_chunks": 1}, as_name="echo_endpoints_crashy")
    started = start_daemon(
        plugins,
        tmp / "state",
        tmp / "daemon.log",
        max_request_body_bytes=BODY_LIMIT,
        plugin_max_execution_timeout=EXECUTION_TIMEOUT,
    )
    started.wait_ready(PLUGIN, CRASHY, "demo/text_toolkit")
    yield started
    started.stop()


@pytest.fixture(scope="module")
def client() -> Iterator[httpx.Client]:
    with httpx.Client(timeout=60) as c:
        yield c


def call(daemon: Daemon, client: httpx.Client, method: str, tenant: str, path: str, **kwargs: Any) -> Any:
    """An ``endpoint/*`` call as ``PluginEndpointClient`` makes it."""
    url = f"{daemon.url}/plugin/{tenant}/endpoint/{path}"
    return dify.request(client, method, url, {"X-Api-Key": daemon.key}, **kwargs)


def identifier(daemon: Daemon, client: httpx.Client, tenant: str, plugin_id: str) -> str:
    url = f"{daemon.url}/plugin/{tenant}/management/list"
    plugins = dify.request(
        client, "GET", url, {"X-Api-Key": daemon.key}, params={"page": 1, "page_size": 100}
    )
    return next(p["plugin_unique_identifier"] for p in plugins["list"] if p["plugin_id"] == plugin_id)


def setup(
    daemon: Daemon,
    client: httpx.Client,
    tenant: str,
    name: str,
    settings: dict[str, Any],
    plugin: str = PLUGIN,
) -> dify_entities.EndpointEntityWithInstance:
    """``create_endpoint``, then the new endpoint as ``list_endpoints_for_single_plugin`` finds it."""
    body = {
        "user_id": "u1",
        "plugin_unique_identifier": identifier(daemon, client, tenant, plugin),
        "settings": settings,
        "name": name,
    }
    assert call(daemon, client, "POST", tenant, "setup", json=body) is True
    found = [e for e in listing(daemon, client, tenant, plugin_id=plugin) if e.name == name]
    assert len(found) == 1
    return found[0]


def listing(
    daemon: Daemon, client: httpx.Client, tenant: str, plugin_id: str | None = None, page_size: int = 100
) -> list[dify_entities.EndpointEntityWithInstance]:
    params: dict[str, Any] = {"page": 1, "page_size": page_size, "user_id": "u1"}
    if plugin_id is not None:
        params["plugin_id"] = plugin_id
    data = call(daemon, client, "GET", tenant, "list/plugin" if plugin_id else "list", params=params)
    return Listing.validate_python(data)


def hook(daemon: Daemon, endpoint: dify_entities.EndpointEntityWithInstance, path: str) -> str:
    return f"{daemon.url}/e/{endpoint.hook_id}{path}"


def error_of(response: httpx.Response) -> dict[str, Any]:
    """Upstream's envelope: ``message`` is the JSON of ``{message, error_type, args}``."""
    body = response.json()
    inner = json.loads(body["message"])
    return {"code": body["code"], "data": body["data"], **inner}


def test_an_endpoint_from_setup_to_removal(daemon: Daemon, client: httpx.Client) -> None:
    endpoint = setup(daemon, client, "t1", "lifecycle", {"greeting": "hello", "api_key": "sk-0123456789"})
    assert endpoint.enabled and endpoint.tenant_id == "t1" and endpoint.plugin_id == PLUGIN
    assert len(endpoint.hook_id) == 16 and endpoint.hook_id.isalnum() and endpoint.hook_id.islower()
    assert endpoint.settings == {"greeting": "hello", "api_key": "sk*********89"}  # the secret is masked
    assert [(e.path, e.method) for e in endpoint.declaration.endpoints or []] == [
        ("/echo", "GET"),
        ("/echo", "POST"),
        ("/stream", "GET"),
    ]
    assert [s.name for s in endpoint.declaration.settings] == ["greeting", "api_key"]
    assert endpoint.id in {e.id for e in listing(daemon, client, "t1")}

    # GET with a query and a header: the plugin sees the request as sent, and the real settings.
    r = client.get(
        hook(daemon, endpoint, "/echo"),
        params=[("b", "2"), ("a", "1"), ("a", "0")],
        headers={"X-Custom": "yes", "X_Underscored": "the SDK would refuse the request"},
    )
    assert r.status_code == 200 and r.headers["x-echo-greeting"] == "hello"
    echo = r.json()
    assert echo["method"] == "GET" and echo["path"] == "/echo" and echo["body"] == ""
    assert echo["query"] == {"a": ["1", "0"], "b": ["2"]}
    assert echo["greeting"] == "hello" and echo["api_key_length"] == len("sk-0123456789")
    host = daemon.url.removeprefix("http://")
    assert echo["headers"] == {
        "Dify-Hook-Id": endpoint.hook_id,
        "Dify-Hook-Url": f"http://{host}/e/{endpoint.hook_id}/echo",
        "Host": host,
        "X-Custom": "yes",
    }

    # POST with a body; the plugin picks the status.
    r = client.post(
        hook(daemon, endpoint, "/echo?status=201"), content=b"a body", headers={"Content-Type": "text/plain"}
    )
    assert r.status_code == 201 and r.headers["content-type"] == "application/json"
    assert r.json()["body"] == "a body" and r.json()["method"] == "POST"
    assert r.json()["headers"]["Content-Type"] == "text/plain"

    # A path the plugin does not serve is the plugin's own 404.
    assert client.get(hook(daemon, endpoint, "/nowhere")).status_code == 404

    # Disabled: 404 in upstream's envelope, and the plugin is not asked.
    assert call(daemon, client, "POST", "t1", "disable", json={"endpoint_id": endpoint.id}) is True
    assert not next(e for e in listing(daemon, client, "t1") if e.id == endpoint.id).enabled
    r = client.get(hook(daemon, endpoint, "/echo"))
    assert r.status_code == 404
    assert error_of(r) == {
        "code": -404,
        "data": None,
        "message": "endpoint not found",
        "error_type": "PluginDaemonNotFoundError",
        "args": None,
    }
    assert (
        call(daemon, client, "POST", "t1", "disable", json={"endpoint_id": endpoint.id}) is True
    )  # idempotent

    assert call(daemon, client, "POST", "t1", "enable", json={"endpoint_id": endpoint.id}) is True
    assert client.get(hook(daemon, endpoint, "/echo")).json()["greeting"] == "hello"

    # Update: new settings reach the plugin; the secret sent back masked keeps its value.
    update = {
        "endpoint_id": endpoint.id,
        "user_id": "u1",
        "name": "renamed",
        "settings": {"greeting": "bonjour", "api_key": "sk*********89"},
    }
    assert call(daemon, client, "POST", "t1", "update", json=update) is True
    updated = next(e for e in listing(daemon, client, "t1") if e.id == endpoint.id)
    assert updated.name == "renamed" and updated.hook_id == endpoint.hook_id
    assert updated.settings == {"greeting": "bonjour", "api_key": "sk*********89"}
    echo = client.get(hook(daemon, endpoint, "/echo")).json()
    assert echo["greeting"] == "bonjour" and echo["api_key_length"] == len("sk-0123456789")
    update["settings"] = {"greeting": "bonjour", "api_key": "new"}
    assert call(daemon, client, "POST", "t1", "update", json=update) is True
    assert client.get(hook(daemon, endpoint, "/echo")).json()["api_key_length"] == 3

    assert (
        call(daemon, client, "POST", "t1", "remove", json={"endpoint_id": endpoint.id, "user_id": "u1"})
        is True
    )
    assert endpoint.id not in {e.id for e in listing(daemon, client, "t1")}
    r = client.get(hook(daemon, endpoint, "/echo"))
    assert r.status_code == 404 and error_of(r)["error_type"] == "PluginDaemonBadRequestError"
    with pytest.raises(dify.PluginDaemonNotFoundError):
        call(daemon, client, "POST", "t1", "remove", json={"endpoint_id": endpoint.id})


def test_a_streamed_body_arrives_chunk_by_chunk(daemon: Daemon, client: httpx.Client) -> None:
    endpoint = setup(daemon, client, "t1", "stream", {"greeting": "hi"})
    r = client.get(hook(daemon, endpoint, "/stream"), params={"chunks": 5})
    assert r.status_code == 200 and r.headers["x-chunks"] == "5"
    assert r.text == "".join(f"hi chunk {n}\n" for n in range(5))

    # The plugin waits a minute between its two chunks: the first must arrive before the second
    # is even made, with the plugin's head, as a chunked body (no length is known yet).
    with client.stream("GET", hook(daemon, endpoint, "/stream"), params={"chunks": 2, "interval": 60}) as r:
        assert r.status_code == 200 and r.headers["x-chunks"] == "2"
        assert "content-length" not in r.headers and r.headers["transfer-encoding"] == "chunked"
        first = next(r.iter_raw())
        assert first == b"hi chunk 0\n"
    # The client left mid-body: the daemon ends the session and serves the next request.
    assert client.get(hook(daemon, endpoint, "/echo")).status_code == 200


def test_the_plugin_listings_count_a_tenants_endpoints(daemon: Daemon, client: httpx.Client) -> None:
    """``endpoints_setups``/``endpoints_active`` of a ``PLUGINS_DIR`` plugin, per tenant, as Dify
    reads them in ``management/list`` and ``installation/fetch/batch``."""

    def counts(method: str, url: str, **kwargs: Any) -> dict[str, tuple[int, int]]:
        data = dify.request(client, method, url, {"X-Api-Key": daemon.key}, **kwargs)
        rows = data["list"] if isinstance(data, dict) else data
        plugins = [dify_entities.PluginInstallation.model_validate(row) for row in rows]
        return {p.plugin_id: (p.endpoints_setups, p.endpoints_active) for p in plugins}

    def both(tenant: str) -> dict[str, tuple[int, int]]:
        base = f"{daemon.url}/plugin/{tenant}/management"
        listed = counts("GET", f"{base}/list", params={"page": 1, "page_size": 100})
        batch = {"plugin_ids": [PLUGIN, "demo/text_toolkit"]}
        assert counts("POST", f"{base}/installation/fetch/batch", json=batch) == {
            k: v for k, v in listed.items() if k in batch["plugin_ids"]
        }
        return listed

    assert both("tc")[PLUGIN] == (0, 0)
    kept = setup(daemon, client, "tc", "kept", {"greeting": "a"})
    switched = setup(daemon, client, "tc", "switched", {"greeting": "b"})
    assert call(daemon, client, "POST", "tc", "disable", json={"endpoint_id": switched.id}) is True
    found = both("tc")
    assert found[PLUGIN] == (2, 1) and found["demo/text_toolkit"] == (0, 0)
    assert both("tc-other")[PLUGIN] == (0, 0)  # another tenant's are not counted
    assert call(daemon, client, "POST", "tc", "remove", json={"endpoint_id": kept.id}) is True
    assert both("tc")[PLUGIN] == (1, 0)


def test_tenants_never_reach_each_others_endpoints(daemon: Daemon, client: httpx.Client) -> None:
    mine = setup(daemon, client, "t1", "private", {"greeting": "mine"})
    theirs = setup(daemon, client, "t2", "theirs", {"greeting": "theirs"})
    assert mine.hook_id != theirs.hook_id
    assert mine.id not in {e.id for e in listing(daemon, client, "t2")}
    assert mine.id not in {e.id for e in listing(daemon, client, "t2", plugin_id=PLUGIN)}
    assert theirs.id not in {e.id for e in listing(daemon, client, "t1")}
    for path, body in (
        ("disable", {"endpoint_id": mine.id}),
        ("enable", {"endpoint_id": mine.id}),
        ("remove", {"endpoint_id": mine.id}),
        (
            "update",
            {"endpoint_id": mine.id, "user_id": "u2", "name": "stolen", "settings": {"greeting": "x"}},
        ),
    ):
        with pytest.raises(dify.PluginDaemonNotFoundError):
            call(daemon, client, "POST", "t2", path, json=body)
    still = next(e for e in listing(daemon, client, "t1") if e.id == mine.id)
    assert still.enabled and still.name == "private" and still.settings == {"greeting": "mine"}
    # Each hook runs its own tenant's endpoint with its own settings.
    assert client.get(hook(daemon, mine, "/echo")).json()["greeting"] == "mine"
    assert client.get(hook(daemon, theirs, "/echo")).json()["greeting"] == "theirs"


def test_bad_requests_get_upstreams_errors(daemon: Daemon, client: httpx.Client) -> None:
    uid = identifier(daemon, client, "t1", PLUGIN)
    good = {"user_id": "u1", "plugin_unique_identifier": uid, "settings": {"greeting": "x"}, "name": "n"}
    url = f"{daemon.url}/plugin/t1/endpoint"
    key = {"X-Api-Key": daemon.key}

    # Bodies that do not bind: HTTP 400, upstream's bad-request type.
    for field in ("user_id", "plugin_unique_identifier", "name"):
        r = client.post(f"{url}/setup", headers=key, json={k: v for k, v in good.items() if k != field})
        assert r.status_code == 400 and field in error_of(r)["message"], r.text
        assert error_of(r)["error_type"] == "PluginDaemonBadRequestError" and error_of(r)["code"] == -400
    for path in ("enable", "disable", "remove"):
        r = client.post(f"{url}/{path}", headers=key, json={})
        assert r.status_code == 400 and "endpoint_id" in error_of(r)["message"]
    r = client.post(f"{url}/setup", headers=key, json={**good, "settings": "not an object"})
    assert r.status_code == 400 and "settings" in error_of(r)["message"]
    r = client.post(
        f"{url}/setup", headers=key, json={**good, "plugin_unique_identifier": "not an identifier"}
    )
    assert r.status_code == 400 and "plugin_unique_identifier" in error_of(r)["message"]
    r = client.post(
        f"{url}/setup",
        headers=key,
        content=b"{broken",
    )
    assert r.status_code == 415
    r = client.get(f"{url}/list", headers=key, params={"page": 1, "page_size": 101})
    assert r.status_code == 400 and "page_size" in error_of(r)["message"]
    for page in ("9" * 23, "9" * 5000):  # past SQLite's integers; past int()'s digits
        r = client.get(f"{url}/list", headers=key, params={"page": page, "page_size": 10})
        assert r.status_code == 400 and "page" in error_of(r)["message"], r.text
    r = client.get(f"{url}/list/plugin", headers=key, params={"page": 1, "page_size": 10})
    assert r.status_code == 400 and "plugin_id" in error_of(r)["message"]
    assert client.get(f"{url}/list", params={"page": 1, "page_size": 10}).status_code == 401
    assert client.post(f"{url}/setup", headers={"X-Api-Key": "wrong"}, json=good).status_code == 401

    # What the service decides: HTTP 200 with the code and type Dify raises on.
    with pytest.raises(dify.PluginNotFoundError):
        call(
            daemon,
            client,
            "POST",
            "t1",
            "setup",
            json={**good, "plugin_unique_identifier": uid[:-4] + "0000"},
        )
    with pytest.raises(dify.PluginPermissionDeniedError):
        toolkit = identifier(daemon, client, "t1", "demo/text_toolkit")
        call(daemon, client, "POST", "t1", "setup", json={**good, "plugin_unique_identifier": toolkit})
    with pytest.raises(dify.PluginDaemonBadRequestError, match="missing required setting: greeting"):
        call(daemon, client, "POST", "t1", "setup", json={**good, "settings": {}})
    with pytest.raises(dify.PluginDaemonBadRequestError, match="setting greeting is not a string"):
        call(daemon, client, "POST", "t1", "setup", json={**good, "settings": {"greeting": 3}})
    unknown = "01900000-0000-7000-8000-000000000000"
    for path in ("enable", "disable", "remove"):
        with pytest.raises(dify.PluginDaemonNotFoundError):
            call(daemon, client, "POST", "t1", path, json={"endpoint_id": unknown})
    with pytest.raises(dify.PluginDaemonNotFoundError):
        call(
            daemon, client, "POST", "t1", "update", json={"endpoint_id": unknown, "user_id": "u", "name": "n"}
        )
    endpoint = setup(daemon, client, "t1", "checked", {"greeting": "x"})
    with pytest.raises(dify.PluginDaemonBadRequestError, match="missing required setting"):
        call(
            daemon,
            client,
            "POST",
            "t1",
            "update",
            json={"endpoint_id": endpoint.id, "user_id": "u", "name": "n", "settings": {}},
        )

    # Unknown hooks, well-formed or not: upstream's 404.
    for path in ("/e/aaaaaaaaaaaaaaaa/echo", "/e/not-a-hook/echo", "/e/aaaaaaaaaaaaaaaa"):
        r = client.get(f"{daemon.url}{path}")
        assert r.status_code == 404 and error_of(r)["message"] == "endpoint not found"


def test_an_oversized_body_is_refused_before_the_plugin(daemon: Daemon, client: httpx.Client) -> None:
    endpoint = setup(daemon, client, "t1", "limits", {"greeting": "x"})
    r = client.post(hook(daemon, endpoint, "/echo"), content=b"x" * (BODY_LIMIT + 1))
    assert r.status_code == 413 and error_of(r)["error_type"] == "PluginDaemonBadRequestError"

    def chunked() -> Iterator[bytes]:  # no Content-Length: counted as it arrives
        for _ in range(BODY_LIMIT // 1024 + 2):
            yield b"y" * 1024

    r = client.post(hook(daemon, endpoint, "/echo"), content=chunked())
    assert r.status_code == 413
    r = client.post(hook(daemon, endpoint, "/echo"), content=b"z" * BODY_LIMIT)
    assert r.status_code == 200 and len(r.json()["body"]) == BODY_LIMIT


def test_a_plugin_dying_mid_body_ends_the_response(daemon: Daemon, client: httpx.Client) -> None:
    """The crashy copy exits after its first chunk: the body ends with the cause, the daemon
    restarts the plugin, and the endpoint answers again."""
    endpoint = setup(daemon, client, "t1", "crash", {"greeting": "boom"}, plugin=CRASHY)
    r = client.get(hook(daemon, endpoint, "/stream"), params={"chunks": 5})
    assert r.status_code == 200
    assert r.text.startswith("boom chunk 0\n") and "boom chunk 1" not in r.text
    assert f"plugin instance {CRASHY}#0" in r.text
    daemon.wait_ready(CRASHY)
    assert client.get(hook(daemon, endpoint, "/echo")).json()["greeting"] == "boom"


def test_the_execution_timeout_ends_an_endpoint_session(daemon: Daemon, client: httpx.Client) -> None:
    endpoint = setup(daemon, client, "t1", "slow", {"greeting": "zz"})
    # Nothing of the body yet: the status is still ours to give, upstream's 500 envelope.
    r = client.get(hook(daemon, endpoint, "/stream"), params={"delay": 60})
    assert r.status_code == 500
    error = error_of(r)
    assert error["error_type"] == "PluginDaemonInternalServerError" and error["code"] == -500
    assert error["message"].startswith("killed by timeout")
    # Mid-body: the plugin's status stands, and the cause ends the body.
    r = client.get(hook(daemon, endpoint, "/stream"), params={"chunks": 2, "interval": 60})
    assert r.status_code == 200 and r.text.startswith("zz chunk 0\n") and "killed by timeout" in r.text


def test_a_shutdown_ends_an_endpoint_response_and_endpoints_outlive_the_daemon(
    sdk_plugins_installed: Path, tmp_path: Path, client: httpx.Client
) -> None:
    plugins = tmp_path / "plugins"
    plugins.mkdir()
    copy_plugin("echo_endpoints", plugins)
    state = tmp_path / "state"
    first = start_daemon(plugins, state, tmp_path / "first.log", server_shutdown_drain_timeout=1)
    try:
        first.wait_ready(PLUGIN)
        endpoint = setup(first, client, "t1", "durable", {"greeting": "still here"})
        with client.stream(
            "GET", hook(first, endpoint, "/stream"), params={"chunks": 2, "interval": 60}
        ) as r:
            chunks = r.iter_raw()
            assert next(chunks) == b"still here chunk 0\n"
            first.proc.send_signal(signal.SIGTERM)
            rest = b"".join(chunks)  # a complete body: no error reading it
        assert b"the daemon is shutting down" in rest
        assert first.proc.wait(timeout=60) in (0, -signal.SIGTERM)  # uvicorn re-raises the signal
    finally:
        first.stop()
    second = start_daemon(plugins, state, tmp_path / "second.log")
    try:
        second.wait_ready(PLUGIN)
        assert [e.id for e in listing(second, client, "t1")] == [endpoint.id]
        assert client.get(hook(second, endpoint, "/echo")).json()["greeting"] == "still here"
    finally:
        second.stop()


def test_a_remote_debug_plugin_serves_its_tenants_endpoints(
    start: Callable[..., Daemon],
    fastproto: Callable[..., Path],
    sdk_plugins_installed: Path,
    client: httpx.Client,
) -> None:
    """The unmodified SDK plugin run with INSTALL_METHOD=remote for one tenant: its endpoint group
    comes over the socket, the tenant sets up an endpoint, the hook reaches the remote process."""
    port = free_port()
    daemon = start(fastproto(), plugin_remote_installing_port=port)
    folder = sdk_plugins_installed / "echo_endpoints"
    env = {
        "PATH": os.environ["PATH"],
        "INSTALL_METHOD": "remote",
        "REMOTE_INSTALL_URL": f"127.0.0.1:{port}",
        "REMOTE_INSTALL_KEY": debugging_key(daemon, "ta"),
        "HEARTBEAT_INTERVAL": "1",
    }
    command = [str(folder / ".venv" / "bin" / "python"), "-m", "main"]
    plugin = subprocess.Popen(
        command, cwd=folder, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        wait_for(lambda: listed(daemon, "ta").get(PLUGIN, {}).get("status") == "ready")
        endpoint = setup(daemon, client, "ta", "remote", {"greeting": "from afar"})
        assert [e.path for e in endpoint.declaration.endpoints or []] == ["/echo", "/echo", "/stream"]
        assert client.get(hook(daemon, endpoint, "/echo")).json()["greeting"] == "from afar"
        # Another tenant does not have the plugin: it cannot set up an endpoint of it.
        with pytest.raises(dify.PluginNotFoundError):
            body = {"user_id": "u", "name": "n", "settings": {"greeting": "x"}}
            body["plugin_unique_identifier"] = identifier(daemon, client, "ta", PLUGIN)
            call(daemon, client, "POST", "tb", "setup", json=body)
        plugin.kill()
        plugin.wait()
        wait_for(lambda: PLUGIN not in listed(daemon, "ta"))
        # Gone with its connection: the hook says so, the endpoint stays for when it is back.
        r = client.get(hook(daemon, endpoint, "/echo"))
        assert r.status_code == 404 and error_of(r)["message"] == "plugin installation not found"
        assert [e.id for e in listing(daemon, client, "ta")] == [endpoint.id]
    finally:
        plugin.kill()
        plugin.wait()


def test_daemons_sharing_a_postgresql_database_share_endpoints(
    start: Callable[..., Daemon],
    sdk_plugins_installed: Path,
    postgres: PostgresServer,
    tmp_path: Path,
    client: httpx.Client,
) -> None:
    """Behind a load balancer: set up through one daemon, called and switched through either."""
    plugins = tmp_path / "plugins"
    plugins.mkdir()
    copy_plugin("echo_endpoints", plugins)
    env = postgres.env(postgres.create_database())
    one, two = start(plugins, **env), start(plugins, **env)
    one.wait_ready(PLUGIN)
    two.wait_ready(PLUGIN)
    endpoint = setup(one, client, "t1", "shared", {"greeting": "either"})
    assert [e.id for e in listing(two, client, "t1")] == [endpoint.id]
    assert client.get(hook(two, endpoint, "/echo")).json()["greeting"] == "either"
    assert call(two, client, "POST", "t1", "disable", json={"endpoint_id": endpoint.id}) is True
    assert client.get(hook(one, endpoint, "/echo")).status_code == 404
    update = {"endpoint_id": endpoint.id, "user_id": "u1", "name": "shared", "settings": {"greeting": "both"}}
    assert call(one, client, "POST", "t1", "update", json=update) is True
    assert call(one, client, "POST", "t1", "enable", json={"endpoint_id": endpoint.id}) is True
    assert client.get(hook(two, endpoint, "/echo")).json()["greeting"] == "both"
