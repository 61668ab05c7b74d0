"""Bad HTTP input: each gets a 4xx with a JSON body saying what was wrong, never a 500 or a hang."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from daemon.testing import Daemon
from tests.test_runtime import FP


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    from daemon.testing import copy_plugin, start_daemon

    tmp = tmp_path_factory.mktemp("dispatch")
    (tmp / "plugins").mkdir()
    copy_plugin("fastproto", tmp / "plugins")
    daemon = start_daemon(tmp / "plugins", tmp / "state", tmp / "daemon.log", max_request_body_bytes=65536)
    daemon.wait_ready(FP)
    yield daemon
    daemon.stop()


GOOD = {"user_id": "u", "data": {"provider": "fastproto", "tool": "emit", "tool_parameters": {}}}


def post(
    daemon: Daemon,
    *,
    content: bytes | None = None,
    json: Any = None,
    tenant: str = "t1",
    headers: dict[str, str] | None = None,
    path: str = "tool/invoke",
) -> httpx.Response:
    h = daemon.headers(FP) if headers is None else headers
    return httpx.post(
        f"{daemon.url}/plugin/{tenant}/dispatch/{path}", headers=h, content=content, json=json, timeout=30
    )


def problem(r: httpx.Response, status: int) -> str:
    assert r.status_code == status, (r.status_code, r.text)
    assert r.headers["content-type"] == "application/json"
    body = r.json()
    assert body["code"] == -status and body["data"] is None
    return body["message"]


def test_the_good_request_works(daemon: Daemon) -> None:
    assert post(daemon, json=GOOD).status_code == 200


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        ({"X-Plugin-ID": FP, "Content-Type": "application/json"}, "missing X-Api-Key header"),
        ({"X-Api-Key": "wrong", "X-Plugin-ID": FP, "Content-Type": "application/json"}, "invalid X-Api-Key"),
    ],
)
def test_missing_or_wrong_key_is_401(daemon: Daemon, headers: dict[str, str], expected: str) -> None:
    assert problem(post(daemon, json=GOOD, headers=headers), 401) == expected


def test_plugin_list_needs_the_key(daemon: Daemon) -> None:
    assert problem(httpx.get(f"{daemon.url}/plugins"), 401) == "missing X-Api-Key header"


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (b"", "empty request body"),
        (b"{", "malformed JSON body"),
        (b'{"user_id": "u", "data": {"provider": "fastproto", "tool": "em', "malformed JSON body"),
        (b"\xff\xfe", "malformed JSON body"),
        (b"[1, 2]", "request body must be a JSON object, got list"),
        (b'"text"', "request body must be a JSON object, got str"),
        (b"null", "request body must be a JSON object, got NoneType"),
    ],
)
def test_malformed_bodies_are_400(daemon: Daemon, content: bytes, expected: str) -> None:
    assert problem(post(daemon, content=content), 400).startswith(expected)


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"data": GOOD["data"]}, "user_id"),
        ({"user_id": 5, "data": GOOD["data"]}, "user_id"),
        ({"user_id": "u"}, "data"),
        ({"user_id": "u", "data": []}, "data"),
        ({"user_id": "u", "data": {"tool": "emit"}}, "data.provider"),
        ({"user_id": "u", "data": {"provider": "fastproto"}}, "data.tool"),
        ({"user_id": "u", "data": {"provider": "fastproto", "tool": 3}}, "data.tool"),
        (
            {"user_id": "u", "data": {"provider": "fastproto", "tool": "emit", "tool_parameters": [1]}},
            "data.tool_parameters",
        ),
        (
            {"user_id": "u", "data": {"provider": "fastproto", "tool": "emit", "credentials": "x"}},
            "data.credentials",
        ),
        ({"user_id": "u", "context": "x", "data": GOOD["data"]}, "context"),
        ({"user_id": "u", "conversation_id": 1, "data": GOOD["data"]}, "conversation_id"),
    ],
)
def test_missing_or_mistyped_fields_are_422_and_named(daemon: Daemon, body: Any, field: str) -> None:
    r = post(daemon, json=body)
    message = problem(r, 422)
    assert message.startswith("invalid request body: ")
    assert field in [e["field"] for e in r.json()["errors"]], r.json()


@pytest.mark.parametrize("value", [None, True, 0, -1.5, "s", "", [], [1, "a"], {}, {"a": {"b": None}}])
def test_parameter_values_of_every_json_type_are_accepted(daemon: Daemon, value: Any) -> None:
    body = {
        "user_id": "u",
        "data": {"provider": "fastproto", "tool": "plain", "tool_parameters": {"count": 0, "extra": value}},
    }
    r = post(daemon, json=body)
    assert r.status_code == 200 and r.text.startswith("data: ")


@pytest.mark.parametrize(
    ("plugin", "body", "expected"),
    [
        ("demo/nope", GOOD, "plugin 'demo/nope' is not installed"),
        (
            FP,
            {"user_id": "u", "data": {"provider": "nope", "tool": "emit"}},
            "plugin 'demo/fastproto' has no tool provider 'nope'",
        ),
        (
            FP,
            {"user_id": "u", "data": {"provider": "fastproto", "tool": "nope"}},
            "provider 'fastproto' of plugin 'demo/fastproto' has no tool 'nope'",
        ),
    ],
)
def test_unknown_plugin_provider_or_tool_is_404(
    daemon: Daemon, plugin: str, body: Any, expected: str
) -> None:
    headers = {**daemon.headers(FP), "X-Plugin-ID": plugin}
    assert problem(post(daemon, json=body, headers=headers), 404) == expected


@pytest.mark.parametrize("plugin_header", ["", "nope", "a/b/c", "a b/c"])
def test_bad_plugin_header_is_400(daemon: Daemon, plugin_header: str) -> None:
    headers = {**daemon.headers(FP), "X-Plugin-ID": plugin_header}
    assert problem(post(daemon, json=GOOD, headers=headers), 400)


def test_upstream_style_plugin_id_with_version_and_checksum_is_accepted(daemon: Daemon) -> None:
    headers = {**daemon.headers(FP), "X-Plugin-ID": "demo/fastproto:0.1.0@0123abcd"}
    assert post(daemon, json=GOOD, headers=headers).status_code == 200


@pytest.mark.parametrize("tenant", ["t%20x", "a.b", "%00", "x" * 65, "%C3%A9"])
def test_invalid_tenant_ids_are_400(daemon: Daemon, tenant: str) -> None:
    assert "tenant_id" in problem(post(daemon, json=GOOD, tenant=tenant), 400)


def test_a_tenant_id_with_a_slash_matches_no_route(daemon: Daemon) -> None:
    assert problem(post(daemon, json=GOOD, tenant="t%2Fx"), 404).startswith("Not Found: POST /plugin/")


@pytest.mark.parametrize("content_type", [None, "text/plain", "application/x-www-form-urlencoded"])
def test_wrong_content_type_is_415(daemon: Daemon, content_type: str | None) -> None:
    headers = {"X-Api-Key": daemon.key, "X-Plugin-ID": FP}
    if content_type:
        headers["Content-Type"] = content_type
    r = post(daemon, content=b'{"user_id":"u"}', headers=headers)
    assert problem(r, 415) == "Content-Type must be application/json"


def test_oversized_body_is_413(daemon: Daemon) -> None:
    big = {**GOOD, "context": {"pad": "x" * 70000}}
    assert problem(post(daemon, json=big), 413) == "request body larger than 65536 bytes"


def test_oversized_chunked_body_without_length_is_413(daemon: Daemon) -> None:
    def chunks() -> Iterator[bytes]:
        yield b'{"user_id": "u", "context": {"pad": "'
        for _ in range(100):
            yield b"x" * 1000
        yield b'"}}'

    r = httpx.post(
        f"{daemon.url}/plugin/t1/dispatch/tool/invoke",
        headers=daemon.headers(FP),
        content=chunks(),
        timeout=30,
    )
    assert problem(r, 413) == "request body larger than 65536 bytes"


def test_unknown_route_and_wrong_method_are_json(daemon: Daemon) -> None:
    assert problem(httpx.get(f"{daemon.url}/nope"), 404)
    assert problem(httpx.get(f"{daemon.url}/plugin/t1/dispatch/tool/invoke"), 405)


def test_a_truncated_request_on_a_raw_socket_does_not_hang_the_daemon(daemon: Daemon) -> None:
    host, port = daemon.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=30) as s:
        s.sendall(
            b"POST /plugin/t1/dispatch/tool/invoke HTTP/1.1\r\nHost: x\r\n"
            b"Content-Type: application/json\r\nContent-Length: 500\r\nX-Api-Key: "
            + daemon.key.encode()
            + b'\r\nX-Plugin-ID: demo/fastproto\r\n\r\n{"user_id"'
        )
    assert post(daemon, json=GOOD).status_code == 200
    assert httpx.get(f"{daemon.url}/health/check").json()["status"] == "ok"


def test_no_request_in_this_module_produced_a_server_error(daemon: Daemon) -> None:
    assert "Traceback" not in daemon.log() and " 500 " not in daemon.log()
