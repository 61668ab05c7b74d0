"""The read-only management routes, read as Dify's API server reads them: each response through
Dify's envelope handling (``tests/dify_client.py``), then parsed with models of Dify's own
entities (``tests/dify_entities.py``). A shape Dify cannot parse fails here."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from pydantic import TypeAdapter

from daemon.declarations import asset_id
from daemon.management import POST_ROUTES, ROUTES
from daemon.testing import PLUGINS, Daemon, free_port, start_daemon
from tests import dify_client as dify
from tests import dify_entities as dify_entities
from tests.test_runtime import wait_for

TOOLS = {"demo/text_toolkit", "demo/notes", "demo/fastproto"}
MODELS = "demo/echo_models"
AGENT = "demo/echo_agent"
ENDPOINTS = "demo/echo_endpoints"
REMOTE = "demo/notes_remote"
DATASOURCE = "demo/web_pages"
TRIGGER = "demo/webhook_events"
ROUTE_OF = dict((*ROUTES, *POST_ROUTES))


def start_with_remote(plugins: Path, tmp: Path) -> Daemon:
    """A daemon over ``plugins`` whose remote-debug port the tests know (``remote_port``)."""
    port = free_port()
    started = start_daemon(plugins, tmp / "state", tmp / "daemon.log", plugin_remote_installing_port=port)
    started.remote_port = port  # type: ignore[attr-defined]
    return started


def remote_env(daemon: Daemon, client: httpx.Client, tenant: str) -> dict[str, str]:
    """The environment that makes an SDK plugin connect to ``daemon`` for ``tenant``."""
    response = client.post(f"{daemon.url}/plugin/{tenant}/debugging/key", headers={"X-Api-Key": daemon.key})
    return {
        "PATH": os.environ["PATH"],
        "INSTALL_METHOD": "remote",
        "REMOTE_INSTALL_URL": f"127.0.0.1:{daemon.remote_port}",  # type: ignore[attr-defined]
        "REMOTE_INSTALL_KEY": response.json()["data"]["key"],
        "HEARTBEAT_INTERVAL": "1",
    }


@pytest.fixture(scope="module")
def daemon(sdk_plugins_installed: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    started = start_with_remote(sdk_plugins_installed, tmp_path_factory.mktemp("management"))
    yield started
    started.stop()


@pytest.fixture(scope="module")
def client() -> Iterator[httpx.Client]:
    with httpx.Client(timeout=60) as c:
        yield c


def get(daemon: Daemon, client: httpx.Client, tenant: str, path: str, **params: Any) -> Any:
    """A management call as ``_request_with_plugin_daemon_response`` makes it."""
    url = f"{daemon.url}/plugin/{tenant}/management/{path}"
    return dify.request(client, "GET", url, {"X-Api-Key": daemon.key}, params=params)


def providers_as_dify_reads_them(
    daemon: Daemon, client: httpx.Client, tenant: str, path: str, items: str, entity: Any, by_id: bool = False
) -> list[Any]:
    """A provider listing as Dify's client fetches it: the first page of 256, its transformer
    (each item's ``identity.provider`` set to the provider's name, or ``plugin_id/provider``
    when ``by_id``), then its pydantic model."""
    data = get(daemon, client, tenant, path, page=1, page_size=256)
    for provider in data:
        name = provider["declaration"]["identity"]["name"]
        for item in provider["declaration"][items]:
            item["identity"]["provider"] = (
                f"{provider['plugin_id']}/{provider['provider']}" if by_id else name
            )
    return TypeAdapter(list[entity]).validate_python(data)


def tool_providers(daemon: Daemon, client: httpx.Client, tenant: str) -> list[Any]:
    """``PluginToolManager.fetch_tool_providers``."""
    return providers_as_dify_reads_them(
        daemon, client, tenant, "tools", "tools", dify_entities.PluginToolProviderEntity
    )


def plugin_list(daemon: Daemon, client: httpx.Client, tenant: str, **params: Any) -> Any:
    params = {"page": 1, "page_size": 256, "response_type": "paged", **params}
    return dify_entities.PluginListResponse.model_validate(get(daemon, client, tenant, "list", **params))


def yaml_names(plugin: str, folder: str) -> set[str]:
    files = (PLUGINS / plugin / folder).glob("*.yaml")
    return {yaml.safe_load(f.read_text())["identity"]["name"] for f in files}


def test_tool_providers_parse_as_dify_reads_them(daemon: Daemon, client: httpx.Client) -> None:
    providers = {p.plugin_id: p for p in tool_providers(daemon, client, "t1")}
    assert set(providers) == TOOLS
    toolkit = providers["demo/text_toolkit"]
    assert toolkit.provider == "text_toolkit" == toolkit.declaration.identity.name
    assert toolkit.plugin_unique_identifier.startswith("demo/text_toolkit:0.1.0@")
    assert {t.identity.name for t in toolkit.declaration.tools} == yaml_names("text_toolkit", "tools")
    word_stats = next(t for t in toolkit.declaration.tools if t.identity.name == "word_stats")
    assert word_stats.output_schema["required"] == ["words", "unique", "top_word"]
    assert [(p.name, p.type, p.form, p.required) for p in word_stats.parameters] == [
        ("text", "string", "llm", True)
    ]
    assert word_stats.description is not None and word_stats.description.llm


def test_a_declared_icon_is_the_id_the_asset_route_serves(daemon: Daemon, client: httpx.Client) -> None:
    toolkit = next(p for p in tool_providers(daemon, client, "t1") if p.plugin_id == "demo/text_toolkit")
    icon = (PLUGINS / "text_toolkit" / "_assets" / "icon.svg").read_bytes()
    assert toolkit.declaration.identity.icon == asset_id("icon.svg", icon)
    r = client.get(
        f"{daemon.url}/plugin/t1/asset/{toolkit.declaration.identity.icon}", headers={"X-Api-Key": daemon.key}
    )
    assert r.status_code == 200 and r.content == icon


def test_one_tool_provider_and_a_missing_one(daemon: Daemon, client: httpx.Client) -> None:
    data = get(daemon, client, "t1", "tool", plugin_id="demo/notes", provider="notes")
    for tool in data["declaration"]["tools"]:
        tool["identity"]["provider"] = "notes"
    notes = dify_entities.PluginToolProviderEntity.model_validate(data)
    assert {t.identity.name for t in notes.declaration.tools} == yaml_names("notes", "tools")
    # Upstream answers an unknown plugin or provider with code -404 PluginNotFoundError (HTTP 200).
    for plugin_id, provider in (("demo/notes", "other"), ("demo/none", "notes"), (MODELS, "echo_models")):
        with pytest.raises(dify.PluginNotFoundError):
            get(daemon, client, "t1", "tool", plugin_id=plugin_id, provider=provider)
    with pytest.raises(dify.PluginDaemonClientSideError, match="plugin_id"):
        get(daemon, client, "t1", "tool", provider="notes")


def check_existence(daemon: Daemon, client: httpx.Client, tenant: str, *ids: tuple[str, str]) -> list[bool]:
    """``PluginInstaller.check_tools_existence``: a JSON body, then ``list[bool]``."""
    url = f"{daemon.url}/plugin/{tenant}/management/tools/check_existence"
    body = {"provider_ids": [{"plugin_id": p, "provider_name": n} for p, n in ids]}
    data = dify.request(client, "POST", url, {"X-Api-Key": daemon.key}, json=body)
    return TypeAdapter(list[bool]).validate_python(data)


def test_tool_existence_is_answered_per_provider_in_order(daemon: Daemon, client: httpx.Client) -> None:
    asked = [
        ("demo/notes", "notes"),
        ("demo/notes", "text_toolkit"),  # a provider of another plugin
        ("demo/none", "notes"),
        ("demo/text_toolkit", "text_toolkit"),
        (MODELS, "echo_models"),  # a model provider is not a tool provider
        ("demo/notes", "notes"),
    ]
    assert check_existence(daemon, client, "t1", *asked) == [True, False, False, True, False, True]
    assert check_existence(daemon, client, "t1") == []


def test_tool_existence_refuses_what_upstream_refuses(daemon: Daemon, client: httpx.Client) -> None:
    url = f"{daemon.url}/plugin/t1/management/tools/check_existence"
    key = {"X-Api-Key": daemon.key}
    for body in ({}, {"provider_ids": [{"plugin_id": "demo/notes"}]}, {"provider_ids": "demo/notes"}):
        with pytest.raises(dify.PluginDaemonClientSideError, match="provider_ids"):
            dify.request(client, "POST", url, key, json=body)
    with pytest.raises(dify.PluginDaemonClientSideError, match="malformed JSON"):
        dify.request(client, "POST", url, {**key, "Content-Type": "application/json"}, content=b"{")
    assert client.post(url, json={"provider_ids": []}).status_code == 401
    assert client.get(url, headers=key).status_code == 405


def test_model_providers_parse_as_dify_reads_them(daemon: Daemon, client: httpx.Client) -> None:
    data = get(daemon, client, "t1", "models", page=1, page_size=256)
    providers = TypeAdapter(list[dify_entities.PluginModelProviderEntity]).validate_python(data)
    assert [p.plugin_id for p in providers] == [MODELS]
    echo = providers[0]
    assert echo.tenant_id == "t1" and echo.provider == "echo_models"
    assert {m.model: m.model_type for m in echo.declaration.models} == {
        "echo-llm": "llm",
        "echo-embed": "text-embedding",
    }
    llm = next(m for m in echo.declaration.models if m.model == "echo-llm")
    assert llm.fetch_from == "predefined-model"
    rule = llm.parameter_rules[0]
    assert (rule.name, rule.type, rule.default, rule.max) == ("max_tokens", "int", 64, 4096)
    assert llm.model_properties[dify_entities.ModelPropertyKey.CONTEXT_SIZE] == 4096
    assert echo.declaration.icon_small is not None
    assert echo.declaration.icon_small.en_US.endswith(".svg") and len(echo.declaration.icon_small.en_US) == 68


def test_agent_strategy_providers_parse_as_dify_reads_them(daemon: Daemon, client: httpx.Client) -> None:
    data = get(daemon, client, "t1", "agent_strategies", page=1, page_size=256)
    for provider in data:
        for strategy in provider["declaration"]["strategies"]:
            strategy["identity"]["provider"] = provider["declaration"]["identity"]["name"]
    providers = TypeAdapter(list[dify_entities.PluginAgentProviderEntity]).validate_python(data)
    assert [p.plugin_id for p in providers] == [AGENT]
    echo = providers[0]
    assert [s.identity.name for s in echo.declaration.strategies] == ["echo"]
    assert [p.name for p in echo.declaration.strategies[0].parameters] == ["query"]
    assert echo.meta.version == "0.0.1"
    one = get(daemon, client, "t1", "agent_strategy", plugin_id=AGENT, provider="echo_agent")
    for strategy in one["declaration"]["strategies"]:  # ``fetch_agent_strategy_provider``'s transformer
        strategy["identity"]["provider"] = "echo_agent"
    single = dify_entities.PluginAgentProviderEntity.model_validate(one)
    assert single.model_dump() == echo.model_dump()
    with pytest.raises(dify.PluginNotFoundError):
        get(daemon, client, "t1", "agent_strategy", plugin_id=AGENT, provider="nope")


def test_the_plugin_list_pages_and_parses_as_dify_reads_it(daemon: Daemon, client: httpx.Client) -> None:
    everything = plugin_list(daemon, client, "t1")
    ids = [p.plugin_id for p in everything.list]
    assert set(ids) == TOOLS | {MODELS, AGENT, ENDPOINTS} and everything.total == len(ids) == 6
    categories = {p.plugin_id: p.declaration.category for p in everything.list}
    assert categories[MODELS] == "model" and categories[AGENT] == "agent-strategy"
    assert categories[ENDPOINTS] == "extension"
    group = next(p for p in everything.list if p.plugin_id == ENDPOINTS).declaration.endpoint
    assert group is not None and [e.path for e in group.endpoints or []] == ["/echo", "/echo", "/stream"]
    assert {categories[t] for t in TOOLS} == {"tool"}
    toolkit = next(p for p in everything.list if p.plugin_id == "demo/text_toolkit")
    assert toolkit.runtime_type == "local" and toolkit.source == "package"
    assert toolkit.plugin_unique_identifier == f"demo/text_toolkit:{toolkit.version}@{toolkit.checksum}"
    assert toolkit.installation_id == toolkit.id and toolkit.tenant_id == "t1"
    assert toolkit.declaration.tool is not None and toolkit.declaration.tool.identity.name == "text_toolkit"

    pages = [plugin_list(daemon, client, "t1", page=n, page_size=2) for n in (1, 2, 3, 4)]
    assert [len(p.list) for p in pages] == [2, 2, 2, 0]
    assert [p.plugin_id for page in pages for p in page.list] == ids
    assert {p.total for p in pages} == {6}
    # Installation ids are per tenant, and stable.
    other = plugin_list(daemon, client, "t2")
    assert {p.id for p in other.list}.isdisjoint({p.id for p in everything.list})
    assert [p.id for p in plugin_list(daemon, client, "t1").list] == [p.id for p in everything.list]


@pytest.mark.parametrize(
    "params",
    [
        {},
        {"page": 1},
        {"page": 0, "page_size": 10},
        {"page": 1, "page_size": 257},
        {"page": "x", "page_size": 1},
    ],
)
@pytest.mark.parametrize("path", ["list", "tools", "models", "agent_strategies", "datasources", "triggers"])
def test_paging_is_required_and_bounded_as_upstream_binds_it(
    daemon: Daemon, client: httpx.Client, path: str, params: dict[str, Any]
) -> None:
    r = client.get(
        f"{daemon.url}/plugin/t1/management/{path}", params=params, headers={"X-Api-Key": daemon.key}
    )
    assert r.status_code == 400
    body = r.json()
    assert body["code"] == -400 and '"PluginDaemonBadRequestError"' in body["message"]


def test_management_routes_need_the_key(daemon: Daemon, client: httpx.Client) -> None:
    for path in (*(p for p, _ in ROUTES), *(p for p, _ in POST_ROUTES)):
        r = client.request(
            "POST" if (path, ROUTE_OF[path]) in POST_ROUTES else "GET",
            f"{daemon.url}/plugin/t1/management/{path}",
            params={"page": 1, "page_size": 1},
        )
        assert r.status_code == 401, path


def remote_copy(tmp: Path) -> Path:
    """The notes plugin under another name and with an icon no local plugin has."""
    copy = tmp / "notes_remote"
    shutil.copytree(PLUGINS / "notes", copy, ignore=shutil.ignore_patterns(".venv", "__pycache__"))
    manifest = (copy / "manifest.yaml").read_text().replace("name: notes\n", "name: notes_remote\n", 1)
    (copy / "manifest.yaml").write_text(manifest)
    (copy / "_assets" / "icon.svg").write_text(
        "<svg xmlns='http://www.w3.org/2000/svg'><title>remote</title></svg>"
    )
    return copy


def test_a_remote_plugin_is_listed_for_its_tenant_while_connected(
    daemon: Daemon, client: httpx.Client, tmp_path: Path
) -> None:
    copy = remote_copy(tmp_path)
    env = remote_env(daemon, client, "tenant-a")
    python = PLUGINS / "notes" / ".venv" / "bin" / "python"
    plugin = subprocess.Popen([str(python), "-m", "main"], cwd=copy, env=env, stdout=subprocess.DEVNULL)
    # A model provider too, under the id of a local plugin: for tenant-a the remote one replaces it.
    models_python = PLUGINS / "echo_models" / ".venv" / "bin" / "python"
    models = subprocess.Popen(
        [str(models_python), "-m", "main"], cwd=PLUGINS / "echo_models", env=env, stdout=subprocess.DEVNULL
    )

    def runtime_types(tenant: str) -> dict[str, str]:
        return {p.plugin_id: p.runtime_type for p in plugin_list(daemon, client, tenant).list}

    try:
        wait_for(
            lambda: runtime_types("tenant-a").get(REMOTE) and runtime_types("tenant-a")[MODELS] == "remote"
        )
        listed = {p.plugin_id: p for p in plugin_list(daemon, client, "tenant-a").list}
        remote = listed[REMOTE]
        assert remote.runtime_type == "remote" and remote.source == "remote"
        assert list(runtime_types("tenant-a")).count(MODELS) == 1
        assert REMOTE not in runtime_types("tenant-b") and runtime_types("tenant-b")[MODELS] == "local"
        data = get(daemon, client, "tenant-a", "models", page=1, page_size=256)
        providers_a = TypeAdapter(list[dify_entities.PluginModelProviderEntity]).validate_python(data)
        assert [p.plugin_id for p in providers_a] == [MODELS]
        assert [m.model for m in providers_a[0].declaration.models] == ["echo-llm", "echo-embed"]

        providers = {p.plugin_id: p for p in tool_providers(daemon, client, "tenant-a")}
        assert {t.identity.name for t in providers[REMOTE].declaration.tools} == yaml_names("notes", "tools")
        assert REMOTE not in {p.plugin_id for p in tool_providers(daemon, client, "tenant-b")}
        assert check_existence(daemon, client, "tenant-a", (REMOTE, "notes")) == [True]
        assert check_existence(daemon, client, "tenant-b", (REMOTE, "notes")) == [False]
        ids = get(daemon, client, "tenant-a", "installation/ids", category="tool")
        assert REMOTE in dify_entities.InstalledIds.model_validate(ids).plugin_ids
        assert (
            REMOTE not in get(daemon, client, "tenant-b", "installation/ids", category="tool")["plugin_ids"]
        )

        # Its uploaded icon is served by the id its declaration names, to its tenant only.
        icon = (copy / "_assets" / "icon.svg").read_bytes()
        assert providers[REMOTE].declaration.identity.icon == asset_id("icon.svg", icon)
        url = f"{daemon.url}/plugin/{{}}/asset/{asset_id('icon.svg', icon)}"
        served = client.get(url.format("tenant-a"), headers={"X-Api-Key": daemon.key})
        assert served.status_code == 200 and served.content == icon
        assert client.get(url.format("tenant-b"), headers={"X-Api-Key": daemon.key}).status_code == 404
    finally:
        for process in (plugin, models):
            process.kill()
            process.wait()
    wait_for(lambda: REMOTE not in runtime_types("tenant-a") and runtime_types("tenant-a")[MODELS] == "local")
    assert REMOTE not in get(daemon, client, "tenant-a", "installation/ids", category="tool")["plugin_ids"]


# Datasource and trigger providers: the test-only plugins of tests/plugins, on the SDK.


@pytest.fixture(scope="module")
def kinds_daemon(test_plugins_installed: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    started = start_with_remote(test_plugins_installed, tmp_path_factory.mktemp("management-kinds"))
    started.wait_ready(DATASOURCE, TRIGGER)
    yield started
    started.stop()


def datasource_providers(daemon: Daemon, client: httpx.Client, tenant: str) -> list[Any]:
    """``PluginDatasourceManager.fetch_datasource_providers`` (before it adds Dify's own local-file one)."""
    return providers_as_dify_reads_them(
        daemon, client, tenant, "datasources", "datasources", dify_entities.PluginDatasourceProviderEntity
    )


def trigger_providers(daemon: Daemon, client: httpx.Client, tenant: str) -> list[Any]:
    """``PluginTriggerClient.fetch_trigger_providers``."""
    return providers_as_dify_reads_them(
        daemon, client, tenant, "triggers", "events", dify_entities.PluginTriggerProviderEntity, by_id=True
    )


def plugin_root(name: str) -> Path:
    return Path(__file__).parent / "plugins" / name


def test_datasource_providers_parse_as_dify_reads_them(kinds_daemon: Daemon, client: httpx.Client) -> None:
    [pages] = datasource_providers(kinds_daemon, client, "t1")
    assert pages.plugin_id == DATASOURCE and pages.provider == "web_pages"
    assert pages.plugin_unique_identifier.startswith(f"{DATASOURCE}:0.1.0@")
    declaration = pages.declaration
    assert declaration.provider_type == dify_entities.DatasourceProviderType.WEBSITE_CRAWL
    assert declaration.identity.tags == ["search", "utilities"]
    icon = (plugin_root("web_pages") / "_assets" / "icon.svg").read_bytes()
    assert declaration.identity.icon == asset_id("icon.svg", icon)
    assert [(c.name, c.type, c.required) for c in declaration.credentials_schema] == [
        ("api_key", "secret-input", False)
    ]
    [crawl] = declaration.datasources
    assert (crawl.identity.name, crawl.identity.provider) == ("crawl", "web_pages")
    assert crawl.identity.icon == declaration.identity.icon
    assert [(p.name, p.type, p.required, p.default) for p in crawl.parameters] == [
        ("url", "string", True, None),
        ("limit", "number", False, 10),
    ]
    assert crawl.parameters[0].description.en_US == "The address to crawl."
    assert crawl.output_schema == {"type": "object", "properties": {"pages": {"type": "integer"}}}

    # ``fetch_datasource_provider``: the same provider, asked for by plugin id and name.
    one = get(kinds_daemon, client, "t1", "datasource", plugin_id=DATASOURCE, provider="web_pages")
    for datasource in one["declaration"]["datasources"]:
        datasource["identity"]["provider"] = "web_pages"
    assert dify_entities.PluginDatasourceProviderEntity.model_validate(one).model_dump() == pages.model_dump()
    assert one["tenant_id"] == "t1" and one["id"] and one["created_at"]
    for plugin_id, provider in (
        (DATASOURCE, "crawl"),
        ("demo/none", "web_pages"),
        (TRIGGER, "webhook_events"),
    ):
        with pytest.raises(dify.PluginNotFoundError):
            get(kinds_daemon, client, "t1", "datasource", plugin_id=plugin_id, provider=provider)
    with pytest.raises(dify.PluginDaemonClientSideError, match="provider"):
        get(kinds_daemon, client, "t1", "datasource", plugin_id=DATASOURCE)


def test_trigger_providers_parse_as_dify_reads_them(kinds_daemon: Daemon, client: httpx.Client) -> None:
    [hooks] = trigger_providers(kinds_daemon, client, "t1")
    assert hooks.plugin_id == TRIGGER and hooks.provider == "webhook_events"
    declaration = hooks.declaration
    identity = declaration.identity
    # Declared with an empty description: it takes the plugin's, as upstream fills it in.
    manifest = yaml.safe_load((plugin_root("webhook_events") / "manifest.yaml").read_text())
    assert identity.description.en_US == manifest["description"]["en_US"]
    icon = (plugin_root("webhook_events") / "_assets" / "icon.svg").read_bytes()
    assert identity.icon == identity.icon_dark == asset_id("icon.svg", icon)
    assert [(c.name, c.type) for c in declaration.subscription_schema] == [("secret", "secret-input")]
    constructor = declaration.subscription_constructor
    assert constructor is not None
    [topic] = constructor.parameters
    assert (topic.name, topic.type, topic.required, topic.default) == ("topic", "select", True, "all")
    assert [o.value for o in topic.options or []] == ["all", "orders"]
    assert [(c.name, c.required) for c in constructor.credentials_schema] == [("token", True)]
    [received] = declaration.events
    assert received.identity.name == "received"
    assert received.identity.provider == f"{TRIGGER}/webhook_events"
    assert [(p.name, p.type, p.required) for p in received.parameters] == [("field", "string", False)]
    assert received.output_schema == {"type": "object"}

    one = get(kinds_daemon, client, "t1", "trigger", plugin_id=TRIGGER, provider="webhook_events")
    for event in one["declaration"]["events"]:  # ``fetch_trigger_provider``'s transformer
        event["identity"]["provider"] = f"{TRIGGER}/webhook_events"
    assert dify_entities.PluginTriggerProviderEntity.model_validate(one).model_dump() == hooks.model_dump()
    for plugin_id, provider in (
        (TRIGGER, "received"),
        ("demo/none", "webhook_events"),
        (DATASOURCE, "web_pages"),
    ):
        with pytest.raises(dify.PluginNotFoundError):
            get(kinds_daemon, client, "t1", "trigger", plugin_id=plugin_id, provider=provider)


def test_the_plugin_list_shows_datasource_and_trigger_plugins(
    kinds_daemon: Daemon, client: httpx.Client
) -> None:
    listed = {p.plugin_id: p for p in plugin_list(kinds_daemon, client, "t1").list}
    assert set(listed) == {DATASOURCE, TRIGGER}
    assert listed[DATASOURCE].declaration.category == "datasource"
    assert listed[TRIGGER].declaration.category == "trigger"
    datasource = listed[DATASOURCE].declaration.datasource
    assert datasource is not None and datasource.identity.name == "web_pages"
    for category, plugin_id in (("datasource", DATASOURCE), ("trigger", TRIGGER)):
        ids = get(kinds_daemon, client, "t1", "installation/ids", category=category)
        assert dify_entities.InstalledIds.model_validate(ids).plugin_ids == [plugin_id]


def test_without_such_plugins_the_lists_are_empty(daemon: Daemon, client: httpx.Client) -> None:
    assert get(daemon, client, "t1", "datasources", page=1, page_size=256) == []
    assert get(daemon, client, "t1", "triggers", page=1, page_size=256) == []
    with pytest.raises(dify.PluginNotFoundError):  # a tool plugin is not a trigger provider
        get(daemon, client, "t1", "trigger", plugin_id="demo/notes", provider="notes")


def test_paging_of_datasources_and_triggers(kinds_daemon: Daemon, client: httpx.Client) -> None:
    for path in ("datasources", "triggers"):
        assert len(get(kinds_daemon, client, "t1", path, page=1, page_size=1)) == 1
        assert get(kinds_daemon, client, "t1", path, page=2, page_size=1) == []


def test_remote_datasource_and_trigger_plugins_are_listed_for_their_tenant(
    kinds_daemon: Daemon, client: httpx.Client
) -> None:
    """The SDK registers a datasource-only or trigger-only plugin over remote debugging; its
    tenant sees the declarations the SDK sent, parsed as Dify parses them, and nobody else does."""
    env = remote_env(kinds_daemon, client, "tenant-a")
    processes = [
        subprocess.Popen(
            [str(plugin_root(name) / ".venv" / "bin" / "python"), "-m", "main"],
            cwd=plugin_root(name),
            env=env,
            stdout=subprocess.DEVNULL,
        )
        for name in ("web_pages", "webhook_events")
    ]

    def runtime_types(tenant: str) -> dict[str, str]:
        return {p.plugin_id: p.runtime_type for p in plugin_list(kinds_daemon, client, tenant).list}

    local_datasource = datasource_providers(kinds_daemon, client, "tenant-b")
    local_trigger = trigger_providers(kinds_daemon, client, "tenant-b")
    try:
        wait_for(lambda: runtime_types("tenant-a") == {DATASOURCE: "remote", TRIGGER: "remote"})
        assert runtime_types("tenant-b") == {DATASOURCE: "local", TRIGGER: "local"}
        [remote_datasource] = datasource_providers(kinds_daemon, client, "tenant-a")
        [remote_trigger] = trigger_providers(kinds_daemon, client, "tenant-a")
    finally:
        for process in processes:
            process.kill()
            process.wait()
    # What the SDK sent describes the same providers the files do (the SDK fills in every language).
    for remote, [local] in ((remote_datasource, local_datasource), (remote_trigger, local_trigger)):
        assert remote.provider == local.provider
        assert remote.plugin_unique_identifier != local.plugin_unique_identifier
        assert english(remote.declaration.model_dump()) == english(local.declaration.model_dump())
    wait_for(lambda: runtime_types("tenant-a") == {DATASOURCE: "local", TRIGGER: "local"})


def english(value: Any) -> Any:
    """A declaration with each I18nObject cut to its ``en_US``."""
    if isinstance(value, dict):
        if "en_US" in value and set(value) <= {"en_US", "zh_Hans", "pt_BR", "ja_JP"}:
            return value["en_US"]
        return {k: english(v) for k, v in value.items()}
    if isinstance(value, list):
        return [english(v) for v in value]
    return value
