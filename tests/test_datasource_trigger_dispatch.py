"""Datasource and trigger dispatch, end to end through real SDK plugins (``tests/plugins``):
each request is the body Dify's API server sends (``api/core/plugin/impl/datasource.py`` and
``trigger.py`` of langgenius/dify), each answer is read as its client reads a stream
(``tests/dify_client.py``) and parsed with the model Dify parses it into (``tests/dify_entities.py``)."""

from __future__ import annotations

import binascii
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from daemon.testing import Daemon, start_daemon
from tests import dify_client as dify
from tests import dify_entities as entities

DATASOURCE = "demo/web_pages"
TRIGGER = "demo/webhook_events"
SUBSCRIPTION = {
    "expires_at": -1,
    "endpoint": "https://dify.example/triggers/plugin/sub-1",
    "parameters": {"topic": "orders"},
    "properties": {"remote_id": "r-7"},
}


@pytest.fixture(scope="module")
def daemon(test_plugins_installed: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    tmp = tmp_path_factory.mktemp("ds-trigger")
    started = start_daemon(test_plugins_installed, tmp / "state", tmp / "daemon.log")
    started.wait_ready(DATASOURCE, TRIGGER)
    yield started
    started.stop()


def call(daemon: Daemon, plugin_id: str, route: str, body: Any) -> list[Any]:
    """POST ``body`` to a dispatch route and read every event as Dify's client does."""
    url = f"{daemon.url}/plugin/t1/dispatch/{route}"
    with httpx.Client(timeout=60) as client:
        return dify.dispatch(client, url, daemon.headers(plugin_id), body)


def webhook(body: dict[str, Any], sender: str) -> str:
    """The webhook request as Dify hands it on: ``serialize_request``'s bytes, hex-encoded."""
    content = json.dumps(body).encode()
    head = (
        "POST /triggers/plugin/sub-1?via=test HTTP/1.1\r\n"
        "Host: dify.example\r\n"
        "Content-Type: application/json\r\n"
        f"Content-Length: {len(content)}\r\n"
        f"X-Sender: {sender}\r\n\r\n"
    )
    return binascii.hexlify(head.encode() + content).decode()


def crawl(daemon: Daemon, parameters: dict[str, Any]) -> list[entities.WebsiteCrawlMessage]:
    """``PluginDatasourceManager.get_website_crawl``."""
    body = {
        "user_id": "u1",
        "data": {
            "provider": "web_pages",
            "datasource": "crawl",
            "credentials": {"api_key": "k"},
            "datasource_parameters": parameters,
        },
    }
    events = call(daemon, DATASOURCE, "datasource/get_website_crawl", body)
    return [entities.WebsiteCrawlMessage.model_validate(e) for e in events]


def test_a_website_crawl_streams_every_message_whole(daemon: Daemon) -> None:
    url = "https://site.example/docs/guide/intro/extra"
    messages = crawl(daemon, {"url": url, "limit": 3})
    assert [(m.result.status, m.result.completed, m.result.total) for m in messages] == [
        ("processing", 1, 3),
        ("processing", 2, 3),
        ("completed", 3, 3),
    ]
    final = messages[-1].result.web_info_list
    assert final is not None
    assert [(p.title, p.content, p.source_url, p.description) for p in final] == [
        (s, f"page {s}", f"{url}#{n}", f"segment {n} of {url}")
        for n, s in enumerate(("docs", "guide", "intro"), 1)
    ]
    # Each progress message carries the pages found so far, not a later message's.
    assert [[p.title for p in m.result.web_info_list or []] for m in messages[:-1]] == [
        ["docs"],
        ["docs", "guide"],
    ]


def test_a_large_crawl_arrives_whole(daemon: Daemon) -> None:
    """The last message (every page, each repeating the 6 KB address) is far larger than a pipe's
    buffer or an SSE read; it must reach Dify as one event, not cut or merged."""
    segments = [f"s{n:02d}-" + "x" * 200 for n in range(30)]
    messages = crawl(daemon, {"url": "https://site.example/" + "/".join(segments), "limit": 30})
    assert len(messages) == 30
    final = messages[-1].result
    assert final.status == "completed" and final.total == final.completed == 30
    assert [p.title for p in final.web_info_list or []] == segments


def test_a_missing_crawl_parameter_is_the_plugins_error_in_difys_envelope(daemon: Daemon) -> None:
    with pytest.raises(dify.PluginInvokeError) as raised:
        crawl(daemon, {"limit": 2})
    assert "url" in raised.value.get_error_message()


def test_a_webhook_is_dispatched_to_its_events(daemon: Daemon) -> None:
    """``PluginTriggerClient.dispatch_event``: Dify sends no ``user_id``; the plugin names the
    sender, the events to run and the HTTP answer for the webhook's caller."""
    payload = {"order": 42, "state": "paid"}
    body = {
        "data": {
            "provider": "webhook_events",
            "subscription": SUBSCRIPTION,
            "credentials": {"token": "t"},
            "credential_type": "api-key",
            "raw_http_request": webhook(payload, "shop-7"),
        }
    }
    events = call(daemon, TRIGGER, "trigger/dispatch_event", body)
    assert len(events) == 1
    answer = entities.TriggerDispatchResponse.model_validate(events[0])
    assert (answer.user_id, answer.events, dict(answer.payload)) == ("shop-7", ["received"], payload)
    assert answer.response.status == 202
    assert answer.response.body == b"ok 2"
    assert answer.response.headers["X-Events"] == "received"


def invoke_event(daemon: Daemon, parameters: dict[str, Any], payload: Any, event: str = "received") -> Any:
    """``PluginTriggerClient.invoke_trigger_event``."""
    body = {
        "user_id": "u1",
        "data": {
            "provider": "webhook_events",
            "event": event,
            "credentials": {"token": "t"},
            "credential_type": "api-key",
            "subscription": SUBSCRIPTION,
            "raw_http_request": webhook(payload, "shop-7"),
            "parameters": parameters,
            "payload": payload,
        },
    }
    events = call(daemon, TRIGGER, "trigger/invoke_event", body)
    assert len(events) == 1
    return entities.TriggerInvokeEventResponse.model_validate(events[0])


def test_an_event_turns_the_payload_into_its_variables(daemon: Daemon) -> None:
    payload = {"order": 42, "state": "paid", "items": [{"sku": "a", "n": 2}], "note": None}
    whole = invoke_event(daemon, {}, payload)
    assert (dict(whole.variables), whole.cancelled) == (payload, False)
    one = invoke_event(daemon, {"field": "items"}, payload)
    assert (dict(one.variables), one.cancelled) == ({"items": [{"sku": "a", "n": 2}]}, False)
    # An event the plugin ignores is an answer, not an error: Dify skips the workflow.
    ignored = invoke_event(daemon, {"field": "refund"}, payload)
    assert (dict(ignored.variables), ignored.cancelled) == ({}, True)


def test_an_unknown_event_is_the_plugins_error_in_difys_envelope(daemon: Daemon) -> None:
    with pytest.raises(dify.PluginInvokeError) as raised:
        invoke_event(daemon, {}, {}, event="no_such_event")
    assert "no_such_event" in raised.value.get_error_message()


def test_datasource_credentials_are_validated(daemon: Daemon) -> None:
    """``PluginDatasourceManager.validate_provider_credentials``: the first answer's ``result``."""
    body = {"user_id": "u1", "data": {"provider": "web_pages", "credentials": {"api_key": "k"}}}
    events = call(daemon, DATASOURCE, "datasource/validate_credentials", body)
    assert [entities.PluginBasicBooleanResponse.model_validate(e).result for e in events] == [True]


def validate_trigger(daemon: Daemon, token: str) -> bool:
    """``PluginTriggerClient.validate_provider_credentials``."""
    body = {"user_id": "u1", "data": {"provider": "webhook_events", "credentials": {"token": token}}}
    events = call(daemon, TRIGGER, "trigger/validate_credentials", body)
    return entities.PluginBasicBooleanResponse.model_validate(events[0]).result


def test_trigger_credentials_are_validated_and_a_refusal_is_difys_error(daemon: Daemon) -> None:
    assert validate_trigger(daemon, "tok-1") is True
    # Dify turns this inner type into its own TriggerProviderCredentialValidationError.
    with pytest.raises(dify.ModelInvokeError) as raised:
        validate_trigger(daemon, "wrong")
    assert raised.value.error_type == "TriggerProviderCredentialValidationError"
    assert "tok-" in str(raised.value)


def subscription_call(daemon: Daemon, route: str, data: dict[str, Any]) -> Any:
    common = {"provider": "webhook_events", "credentials": {"token": "tok-1"}, "credential_type": "api-key"}
    body = {"user_id": "u1", "data": common | data}
    events = call(daemon, TRIGGER, route, body)
    assert len(events) == 1
    return entities.TriggerSubscriptionResponse.model_validate(events[0]).subscription


def test_a_subscription_is_made_refreshed_and_removed(daemon: Daemon) -> None:
    """``subscribe``, ``refresh`` and ``unsubscribe`` as Dify sends them, each answer parsed as
    its ``TriggerSubscriptionResponse`` and the subscriptions as its ``Subscription``."""
    endpoint = "https://dify.example/triggers/plugin/sub-2"
    made = entities.Subscription.model_validate(
        subscription_call(
            daemon, "trigger/subscribe", {"endpoint": endpoint, "parameters": {"topic": "orders"}}
        )
    )
    assert (made.endpoint, dict(made.parameters or {}), dict(made.properties)) == (
        endpoint,
        {"topic": "orders"},
        {"topic": "orders"},
    )
    assert made.expires_at > 0
    stale = made.model_dump() | {"expires_at": 1}
    refreshed = entities.Subscription.model_validate(
        subscription_call(daemon, "trigger/refresh", {"subscription": stale})
    )
    assert refreshed.expires_at > 1 and refreshed.endpoint == endpoint
    assert dict(refreshed.properties) == {"topic": "orders"}
    removed = subscription_call(daemon, "trigger/unsubscribe", {"subscription": refreshed.model_dump()})
    assert removed == {"success": True, "message": f"removed {endpoint}"}
