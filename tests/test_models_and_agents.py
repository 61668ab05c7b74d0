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
from tests import dify_entities
from tests.test_runtime import wait_for

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


def poll(daemon: Daemon, client: httpx.Client, route: str, data: dict[str, Any]) -> Any:
    """A polling call as Dify makes it: one JSON answer, parsed as graphon's ``LLMPollingResult``."""
    url = f"{daemon.url}/plugin/t1/dispatch/model/polling/{route}"
    body = {"user_id": "u1", "data": data}
    answer = dify.request(client, "POST", url, daemon.headers(MODELS), json=body)
    return dify_entities.LLMPollingResult.model_validate(answer)


def start(text: str) -> dict[str, Any]:
    return {**llm(text), "stream": False}  # the SDK's polling request takes only False


def check(state: dict[str, Any] | None) -> dict[str, Any]:
    fields = {"provider": "echo_models", "model": "echo-llm", "model_type": "llm", "credentials": {}}
    return {**fields, "plugin_state": state}


def test_an_llm_answers_by_polling(daemon: Daemon, client: httpx.Client) -> None:
    started = poll(daemon, client, "start", start("hello big world"))
    assert started.status == "running" and started.next_check_after_seconds == 1
    first = poll(daemon, client, "check", check(started.plugin_state))
    assert first.status == "running" and first.plugin_state is not None
    done = poll(daemon, client, "check", check(first.plugin_state))
    assert done.status == "succeeded" and done.result is not None
    assert done.result["message"]["content"] == "echo: hello big world"
    assert done.result["usage"]["prompt_tokens"] == 3 and done.result["usage"]["completion_tokens"] == 4


def test_a_failed_polling_is_an_answer_and_a_raising_model_an_http_500(
    daemon: Daemon, client: httpx.Client
) -> None:
    started = poll(daemon, client, "start", start("fail"))
    failed = poll(daemon, client, "check", check(started.plugin_state))
    assert failed.status == "failed" and failed.error == "echo-llm gave up on this prompt"

    # As upstream: HTTP 500 with the stream's error envelope (Dify raises on the status).
    url = f"{daemon.url}/plugin/t1/dispatch/model/polling/start"
    body = {"user_id": "u1", "data": start("raise rate limit")}
    with pytest.raises(dify.PluginDaemonInternalServerError):
        dify.request(client, "POST", url, daemon.headers(MODELS), json=body)
    r = client.post(url, headers=daemon.headers(MODELS), json=body)
    assert r.status_code == 500 and r.headers["content-type"] == "application/json"
    envelope = r.json()
    assert envelope["code"] == -500 and envelope["data"] is None
    outer = json.loads(envelope["message"])
    assert outer["error_type"] == "PluginInvokeError"
    assert json.loads(outer["message"])["error_type"] == "InvokeRateLimitError"


def test_a_caller_that_leaves_a_polling_call_ends_its_session(daemon: Daemon, client: httpx.Client) -> None:
    def open_sessions() -> int:
        return sum(i["sessions"] for i in daemon.plugins()[MODELS]["instances"])

    url = f"{daemon.url}/plugin/t1/dispatch/model/polling/start"
    body = {"user_id": "u1", "data": start("wait 300")}
    with pytest.raises(httpx.ReadTimeout), httpx.Client(timeout=httpx.Timeout(60, read=0.5)) as leaving:
        leaving.post(url, headers=daemon.headers(MODELS), json=body)
    # The plugin is still sleeping; the daemon has ended the session all the same.
    wait_for(lambda: open_sessions() == 0, limit=60)


def test_a_polling_check_without_its_state_never_reaches_the_plugin(
    daemon: Daemon, client: httpx.Client
) -> None:
    url = f"{daemon.url}/plugin/t1/dispatch/model/polling/check"
    for data, field in (
        (check({}), "data.plugin_state"),
        (check(None), "data.plugin_state"),
        ({**check({"prompt": "x"}), "model_type": "text-embedding"}, "data.model_type"),
    ):
        r = client.post(url, headers=daemon.headers(MODELS), json={"user_id": "u1", "data": data})
        assert r.status_code == 422, data
        inner = json.loads(r.json()["message"])
        assert field in [e["field"] for e in inner["args"]["errors"]]


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
