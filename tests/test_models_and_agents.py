"""Model-provider and agent-strategy plugins on the real SDK, through the daemon's HTTP routes,
read as Dify's API server reads them (``tests/dify_client.py``)."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from daemon.testing import PLUGINS, Daemon
from tests import dify_client as dify

MODELS = "demo/echo_models"
AGENT = "demo/echo_agent"


@pytest.fixture(scope="module")
def daemon(sdk_daemon: Daemon) -> Daemon:
    sdk_daemon.wait_ready(MODELS, AGENT)
    return sdk_daemon


@pytest.fixture(scope="module")
def client() -> Iterator[httpx.Client]:
    with httpx.Client(timeout=60) as c:
        yield c


def call(daemon: Daemon, client: httpx.Client, plugin: str, route: str, data: dict[str, Any]) -> list[Any]:
    url = f"{daemon.url}/plugin/t1/dispatch/{route}"
    return dify.dispatch(client, url, daemon.headers(plugin), {"user_id": "u1", "data": data})


def llm(text: str, **parameters: Any) -> dict[str, Any]:
    return {
        "provider": "echo_models",
        "model": "echo-llm",
        "model_type": "llm",
        "credentials": {},
        "prompt_messages": [{"role": "user", "content": text}],
        "model_parameters": parameters,
        "stream": True,
    }


def test_an_llm_streams_its_chunks_in_order(daemon: Daemon, client: httpx.Client) -> None:
    chunks = call(daemon, client, MODELS, "llm/invoke", llm("hello big world"))
    assert [c["delta"]["message"]["content"] for c in chunks] == ["echo:", " hello", " big", " world"]
    assert [c["delta"]["finish_reason"] for c in chunks] == [None, None, None, "stop"]
    assert chunks[-1]["delta"]["usage"]["completion_tokens"] == 4
    assert all(c["model"] == "echo-llm" for c in chunks)


def test_model_parameters_reach_the_model(daemon: Daemon, client: httpx.Client) -> None:
    chunks = call(daemon, client, MODELS, "llm/invoke", llm("one two three", max_tokens=2))
    assert [c["delta"]["message"]["content"] for c in chunks] == ["echo:", " one"]
    assert chunks[-1]["delta"]["finish_reason"] == "length"


def test_llm_num_tokens(daemon: Daemon, client: httpx.Client) -> None:
    data = {k: v for k, v in llm("a b c d").items() if k not in ("model_parameters", "stream")}
    assert call(daemon, client, MODELS, "llm/num_tokens", data) == [{"num_tokens": 4}]


def test_a_rate_limited_model_is_the_error_class_dify_maps_it_to(
    daemon: Daemon, client: httpx.Client
) -> None:
    with pytest.raises(dify.ModelInvokeError) as caught:
        call(daemon, client, MODELS, "llm/invoke", llm("raise rate limit"))
    assert caught.value.error_type == "InvokeRateLimitError"


def test_text_embeddings_and_their_token_counts(daemon: Daemon, client: httpx.Client) -> None:
    data = {
        "provider": "echo_models",
        "model": "echo-embed",
        "model_type": "text-embedding",
        "credentials": {},
        "texts": ["an apple", "pie"],
        "input_type": "document",
    }
    [result] = call(daemon, client, MODELS, "text_embedding/invoke", data)
    assert result["embeddings"] == [[2.0, 8.0, 3.0], [1.0, 3.0, 2.0]]
    assert result["usage"]["total_tokens"] == 3
    counts = call(daemon, client, MODELS, "text_embedding/num_tokens", data)
    assert counts == [{"num_tokens": [2, 1]}]


def test_provider_credentials_pass_or_fail_as_dify_expects(daemon: Daemon, client: httpx.Client) -> None:
    data = {"provider": "echo_models", "credentials": {"api_key": "good"}}
    [answer] = call(daemon, client, MODELS, "model/validate_provider_credentials", data)
    assert answer["result"] is True
    data["credentials"] = {"api_key": "wrong"}
    with pytest.raises(dify.ModelInvokeError) as caught:
        call(daemon, client, MODELS, "model/validate_provider_credentials", data)
    assert caught.value.error_type == "CredentialsValidateFailedError"
    assert str(caught.value) == "api_key 'wrong' was rejected"


def test_model_schema(daemon: Daemon, client: httpx.Client) -> None:
    data = {"provider": "echo_models", "model": "echo-llm", "model_type": "llm", "credentials": {}}
    [answer] = call(daemon, client, MODELS, "model/schema", data)
    assert answer["model_schema"]["model"] == "echo-llm"
    assert answer["model_schema"]["model_properties"]["context_size"] == 4096


def test_an_agent_strategy_streams_its_rounds_and_answer(daemon: Daemon, client: httpx.Client) -> None:
    data = {
        "agent_strategy_provider": "echo_agent",
        "agent_strategy": "echo",
        "agent_strategy_params": {"query": "red green blue"},
    }
    messages = call(daemon, client, AGENT, "agent_strategy/invoke", data)
    logs = [m["message"] for m in messages if m["type"] == "log"]
    assert [(log["label"], log["data"]) for log in logs] == [
        ("round 1", {"word": "red"}),
        ("round 2", {"word": "green"}),
        ("round 3", {"word": "blue"}),
    ]
    assert [m["message"] for m in messages if m["type"] == "text"] == [{"text": "blue green red"}]
    assert [m["message"] for m in messages if m["type"] == "json"] == [{"json_object": {"rounds": 3}}]


def test_an_agent_strategy_that_raises_is_a_plugin_invoke_error(daemon: Daemon, client: httpx.Client) -> None:
    data = {
        "agent_strategy_provider": "echo_agent",
        "agent_strategy": "echo",
        "agent_strategy_params": {"query": "fail"},
    }
    with pytest.raises(dify.PluginInvokeError) as caught:
        call(daemon, client, AGENT, "agent_strategy/invoke", data)
    assert caught.value.get_error_type() == "RuntimeError"
    assert caught.value.get_error_message() == "echo strategy was asked to fail"


def test_installed_plugin_ids_by_category_for_any_tenant(daemon: Daemon, client: httpx.Client) -> None:
    def ids(tenant: str, category: str) -> list[str]:
        url = f"{daemon.url}/plugin/{tenant}/management/installation/ids"
        data = dify.request(client, "GET", url, {"X-Api-Key": daemon.key}, params={"category": category})
        return data["plugin_ids"]

    assert ids("t1", "model") == [MODELS]
    assert ids("another-tenant", "agent-strategy") == [AGENT]
    tools = ids("t1", "tool")
    assert {"demo/text_toolkit", "demo/notes", "demo/fastproto"} <= set(tools)
    assert MODELS not in tools and AGENT not in tools
    with pytest.raises(dify.PluginDaemonClientSideError):
        ids("t1", "toys")


def test_an_icon_is_served_by_upstreams_asset_id(daemon: Daemon, client: httpx.Client) -> None:
    icon = (PLUGINS / "echo_models" / "_assets" / "icon.svg").read_bytes()
    asset_id = hashlib.sha256(icon + b"icon.svg").hexdigest() + ".svg"
    r = client.get(f"{daemon.url}/plugin/t1/asset/{asset_id}", headers={"X-Api-Key": daemon.key})
    assert r.status_code == 200 and r.content == icon
    assert r.headers["content-type"] == "application/octet-stream"
    missing = client.get(f"{daemon.url}/plugin/t1/asset/{'0' * 64}.svg", headers={"X-Api-Key": daemon.key})
    assert missing.status_code == 404
    assert json.loads(missing.json()["message"])["error_type"] == "PluginDaemonNotFoundError"
    assert client.get(f"{daemon.url}/plugin/t1/asset/{asset_id}").status_code == 401
