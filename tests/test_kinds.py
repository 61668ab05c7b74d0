"""Every dispatch kind: a route per row of the table, checked and relayed with the row's envelope."""

from __future__ import annotations

import json
import typing
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from daemon.dispatch import KINDS, Kind
from daemon.testing import REPO, Daemon, serving
from tests import dify_client as dify

FP = "demo/fastproto"


@pytest.fixture(scope="module")
def echo_daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    with serving(
        tmp_path_factory.mktemp("kinds"), [("fastproto", {"echo_other_kinds": True}, None)]
    ) as daemon:
        daemon.wait_ready(FP)
        yield daemon


def minimal_data(kind: Kind) -> dict[str, Any]:
    """The fewest fields the kind's data model takes, each with a plain value."""
    data: dict[str, Any] = {}
    for name, field in kind.data.model_fields.items():
        if not field.is_required():
            continue
        args = typing.get_args(field.annotation)
        if typing.get_origin(field.annotation) is typing.Literal:
            data[name] = args[0]
        elif name == "model_type":
            data[name] = "llm"
        elif typing.get_origin(field.annotation) is dict:
            data[name] = {f"{name}-key": 1}
        else:
            data[name] = f"{name}-1"
    return data


def test_the_table_has_every_route_upstream_serves_on_the_dispatch_path() -> None:
    routes = {kind.route for kind in KINDS}
    assert len(routes) == len(KINDS)
    for expected in (
        "tool/invoke",
        "tool/get_runtime_parameters",
        "llm/invoke",
        "text_embedding/num_tokens",
        "rerank/invoke",
        "tts/model/voices",
        "speech2text/invoke",
        "moderation/invoke",
        "model/validate_model_credentials",
        "model/schema",
        "agent_strategy/invoke",
        "oauth/refresh_credentials",
        "dynamic_select/fetch_parameter_options",
        "datasource/online_drive_download_file",
        "trigger/dispatch_event",
        "model/polling/start",
        "model/polling/check",
    ):
        assert expected in routes


def test_the_readme_lists_every_kind() -> None:
    readme = (REPO / "README.md").read_text()
    for kind in KINDS:
        assert f"| `{kind.route}` | `{kind.type}` | `{kind.action}` |" in readme, kind.route


@pytest.mark.parametrize("kind", [k for k in KINDS if k.type != "tool"], ids=lambda k: k.route)
def test_each_kind_reaches_the_plugin_with_its_type_and_action(echo_daemon: Daemon, kind: Kind) -> None:
    data = {**minimal_data(kind), "extra_field": [1, {"a": None}]}
    body = {"user_id": "u9", "app_id": "app-1", "data": data}
    url = f"{echo_daemon.url}{kind.path.format(tenant_id='t1')}"
    with httpx.Client(timeout=30) as client:
        if kind.framing == "json":  # one plain JSON answer, read as Dify reads a non-streamed one
            events = [dify.request(client, "POST", url, echo_daemon.headers(FP), json=body)]
        else:
            events = dify.dispatch(client, url, echo_daemon.headers(FP), body)
    assert len(events) == 1
    echoed = events[0]["echo"]
    assert (echoed["type"], echoed["action"], echoed["user_id"]) == (kind.type, kind.action, "u9")
    # Every field the caller sent reaches the plugin as sent (credentials default to {}).
    assert {k: echoed[k] for k in data} == data


@pytest.mark.parametrize("kind", [k for k in KINDS if "model" in k.data.model_fields], ids=lambda k: k.route)
def test_a_model_request_without_its_model_is_refused_before_the_plugin(
    echo_daemon: Daemon, kind: Kind
) -> None:
    data = minimal_data(kind)
    del data["model"]
    r = httpx.post(
        f"{echo_daemon.url}{kind.path.format(tenant_id='t1')}",
        headers=echo_daemon.headers(FP),
        json={"user_id": "u", "data": data},
        timeout=30,
    )
    assert r.status_code == 422
    inner = json.loads(r.json()["message"])
    assert inner["error_type"] == "PluginDaemonBadRequestError"
    assert "data.model" in [e["field"] for e in inner["args"]["errors"]]
