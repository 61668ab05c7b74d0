"""Bad HTTP input: each gets a 4xx with a JSON body saying what was wrong, never a 500 or a hang."""

from __future__ import annotations

import copy
import json
import socket
from collections.abc import Iterator
from typing import Any
from urllib.parse import quote

import httpx
import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from daemon import dispatch
from daemon.dispatch import BadRequest
from daemon.testing import Daemon, parse_sse
from tests import strategies
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


UPSTREAM_TYPES = {
    "PluginDaemonBadRequestError",
    "PluginDaemonUnauthorizedError",
    "PluginDaemonNotFoundError",
    "PluginNotFoundError",
    "PluginDaemonInternalServerError",
}
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
    assert body["code"] == (-500 if status >= 500 else -status) and body["data"] is None
    # Upstream's shape: ``message`` is the JSON of ``{message, error_type, args}``.
    inner = json.loads(body["message"])
    assert inner["error_type"] in UPSTREAM_TYPES, inner
    return inner["message"]


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
        (b"[" * 60_000, "malformed JSON body: depth limit exceeded"),
        (b'{"a":' * 2000 + b"1" + b"}" * 2000, "malformed JSON body: depth limit exceeded"),
        (b'{"user_id": NaN}', "malformed JSON body"),
        (b'{"user_id": Infinity}', "malformed JSON body"),
        (b'{"user_id": 1e999}', "malformed JSON body: number is infinity"),
        (b'\xef\xbb\xbf{"user_id": "u"}', "malformed JSON body: UTF-8 byte order mark"),
        (b'{"user_id": "\\ud800"}', "malformed JSON body: no low surrogate"),
        (b'{"user_id": "a\x01b"}', "malformed JSON body: unexpected control character"),
        (b'{"user_id": "u"} {}', "malformed JSON body: unexpected content after document"),
    ],
)
def test_malformed_bodies_are_400(daemon: Daemon, content: bytes, expected: str) -> None:
    assert problem(post(daemon, content=content), 400).startswith(expected)


@pytest.mark.parametrize(
    ("body", "field"),
    [
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
        ({"user_id": "u" * 257, "data": GOOD["data"]}, "user_id"),
        ({"user_id": "u", "data": {"provider": "", "tool": "emit"}}, "data.provider"),
        ({"user_id": "u", "data": {"provider": "fastproto", "tool": "t" * 257}}, "data.tool"),
        ({"user_id": "u", "data": {**GOOD["data"], "credential_type": 1}}, "data.credential_type"),
        ({"user_id": ["u"], "data": GOOD["data"]}, "user_id"),
    ],
)
def test_missing_or_mistyped_fields_are_422_and_named(daemon: Daemon, body: Any, field: str) -> None:
    r = post(daemon, json=body)
    message = problem(r, 422)
    assert message.startswith("invalid request body: ")
    assert field in [e["field"] for e in json.loads(r.json()["message"])["args"]["errors"]], r.json()


@pytest.mark.parametrize("value", [None, True, 0, -1.5, "s", "", [], [1, "a"], {}, {"a": {"b": None}}])
def test_parameter_values_of_every_json_type_are_accepted(daemon: Daemon, value: Any) -> None:
    body = {
        "user_id": "u",
        "data": {"provider": "fastproto", "tool": "plain", "tool_parameters": {"count": 0, "extra": value}},
    }
    r = post(daemon, json=body)
    assert r.status_code == 200 and r.text.startswith("data: ")


def test_an_unknown_plugin_is_404_plugin_not_found(daemon: Daemon) -> None:
    headers = {**daemon.headers(FP), "X-Plugin-ID": "demo/nope"}
    r = post(daemon, json=GOOD, headers=headers)
    assert problem(r, 404) == "plugin 'demo/nope' is not installed"
    assert json.loads(r.json()["message"])["error_type"] == "PluginNotFoundError"


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        ({"provider": "nope", "tool": "emit"}, "Provider `nope` not found"),
        ({"provider": "fastproto", "tool": "nope"}, "Tool `nope` not found for provider `fastproto`"),
    ],
)
def test_an_unknown_provider_or_tool_goes_to_the_plugin(daemon: Daemon, data: Any, expected: str) -> None:
    """As upstream: the daemon does not judge the plugin's declarations; the plugin answers."""
    events = parse_sse(post(daemon, json={"user_id": "u", "data": data}).content)
    assert events[-1].envelope["error_type"] == "PluginInvokeError"
    assert expected in events[-1].error["message"]


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


@pytest.mark.parametrize(
    "content_type", [None, "text/plain", "application/x-www-form-urlencoded", "application/jsonx", "json"]
)
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


@pytest.mark.parametrize("content_type", ["application/json; charset=utf-8", "APPLICATION/JSON"])
def test_json_content_type_with_parameters_or_capitals_is_accepted(daemon: Daemon, content_type: str) -> None:
    headers = {**daemon.headers(FP), "Content-Type": content_type}
    assert post(daemon, json=PLAIN, headers=headers).status_code == 200


@pytest.mark.parametrize(
    ("body", "status", "expected"),
    [
        (b'{"user_id": "u"}', 422, "invalid request body: data: Field required"),
        (b'{"user_id": "u", "data": {"provider": "fastproto", "credentials": []}}', 422, "credentials"),
        (b"{", 400, "malformed JSON body"),
    ],
)
def test_bad_credential_validations_are_4xx(daemon: Daemon, body: bytes, status: int, expected: str) -> None:
    message = problem(post(daemon, content=body, path="tool/validate_credentials"), status)
    assert expected in message


def raw_request(daemon: Daemon, request: bytes) -> bytes:
    """Send bytes no HTTP client would, half-close, and read the whole answer."""
    host, port = daemon.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=30) as s:
        s.sendall(request)
        s.shutdown(socket.SHUT_WR)
        answer = b""
        while chunk := s.recv(65536):
            answer += chunk
    return answer


def raw_invoke(daemon: Daemon, headers: bytes, body: bytes = b'{"user_id": "u"}') -> bytes:
    return raw_request(
        daemon,
        b"POST /plugin/t1/dispatch/tool/invoke HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        + headers
        + b"Content-Length: %d\r\n\r\n" % len(body)
        + body,
    )


@pytest.mark.parametrize(
    ("headers", "status", "expected"),
    [
        (b"X-Plugin-ID: demo/fastproto\r\nX-Api-Key: \xe9\xff\r\n", 401, b"invalid X-Api-Key"),
        (b"X-Plugin-ID: demo/fastproto\r\nX-Api-Key: \r\n", 401, b"invalid X-Api-Key"),
        (b"X-Plugin-ID: demo/\xe9\r\nX-Api-Key: KEY\r\n", 400, b"is not of the form author/name"),
    ],
)
def test_header_bytes_no_client_would_send_get_a_json_4xx(
    daemon: Daemon, headers: bytes, status: int, expected: bytes
) -> None:
    answer = raw_invoke(daemon, headers.replace(b"KEY", daemon.key.encode()))
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 %d " % status), answer[:200]
    assert b"content-type: application/json" in head
    assert expected in body


@pytest.mark.parametrize(
    "request_bytes",
    [
        b"POST /plugin/t1/dispatch/tool/invoke HTTP/1.1\r\nHost: x\r\nContent-Length: abc\r\n\r\n{}",
        b"POST /plugin/t1/dispatch/tool/invoke HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n"
        b"\r\nzz\r\n0\r\n\r\n",
        b"POST /plugin/t\xe9/dispatch/tool/invoke HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n{}",
        b"\x00\x01 not http at all\r\n\r\n",
    ],
)
def test_broken_http_framing_is_refused_by_the_server_with_400(daemon: Daemon, request_bytes: bytes) -> None:
    """Below the app: uvicorn answers a plain-text 400 and closes; the daemon serves on."""
    answer = raw_request(daemon, request_bytes)
    assert answer.startswith(b"HTTP/1.1 400 "), answer[:200]
    assert post(daemon, json=PLAIN).status_code == 200


# -- properties: whatever arrives, the answer is a stream or a JSON 4xx, never a 500 or a hang --------

PLAIN = {"user_id": "u", "data": {"provider": "fastproto", "tool": "plain", "tool_parameters": {"count": 0}}}
# fastproto parameters that would make an invocation slow, endless or fatal; generated keys avoid them.
FAULT_PARAMETERS = {"count", "size", "delay_ms", "hang", "stop_heartbeat", "crash_at", "oversized", "garbage"}
json_values = strategies.json_values(st.text(max_size=8).filter(lambda k: k not in FAULT_PARAMETERS))
FIELDS = [("user_id",), ("data",), ("context",), ("conversation_id",), ("data", "provider")]
FIELDS += [
    ("data", "tool"),
    ("data", "tool_parameters"),
    ("data", "credentials"),
    ("data", "credential_type"),
]


@st.composite
def mutated_requests(draw: st.DrawFn) -> Any:
    """The good request with some fields replaced by any JSON value or removed."""
    body = copy.deepcopy(PLAIN)
    for path in draw(st.lists(st.sampled_from(FIELDS), max_size=3, unique=True)):
        parent = body
        for name in path[:-1]:
            parent = parent.get(name) if isinstance(parent, dict) else None
        if not isinstance(parent, dict):
            continue
        if draw(st.booleans()):
            parent.pop(path[-1], None)
        else:
            parent[path[-1]] = draw(json_values)
    return body


def assert_stream_or_json_4xx(r: httpx.Response) -> None:
    if r.status_code == 200:
        assert r.headers["content-type"] == "text/event-stream"
        assert parse_sse(r.content)
        return
    assert 400 <= r.status_code < 500, (r.status_code, r.text)
    body = r.json()
    assert body["code"] == -r.status_code and body["data"] is None
    assert json.loads(body["message"])["message"]


PROPERTY = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@PROPERTY
@given(body=mutated_requests() | json_values)
def test_any_json_body_gets_a_stream_or_a_json_4xx(daemon: Daemon, body: Any) -> None:
    assert_stream_or_json_4xx(post(daemon, json=body))


@PROPERTY
@given(content=st.binary(max_size=300) | json_values.map(lambda v: orjson.dumps(v)[:-1]))
def test_any_bytes_or_truncated_json_get_a_json_4xx(daemon: Daemon, content: bytes) -> None:
    r = post(daemon, content=content)
    assert_stream_or_json_4xx(r)
    assert r.status_code != 200 or content.strip().startswith(b"{")


header_text = st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7E), max_size=40)


@PROPERTY
@given(tenant=st.text(max_size=70), plugin=header_text, key=header_text)
def test_any_tenant_plugin_id_or_key_gets_a_stream_or_a_json_4xx(
    daemon: Daemon, tenant: str, plugin: str, key: str
) -> None:
    headers = {"X-Api-Key": key, "X-Plugin-ID": plugin, "Content-Type": "application/json"}
    r = post(daemon, json=PLAIN, tenant=quote(tenant, safe=""), headers=headers)
    assert_stream_or_json_4xx(r)
    assert r.status_code in (401, 404)  # a wrong key, unless no route matched at all
    headers["X-Api-Key"] = daemon.key
    assert_stream_or_json_4xx(post(daemon, json=PLAIN, tenant=quote(tenant, safe=""), headers=headers))


@settings(max_examples=500, deadline=None)
@given(body=mutated_requests() | json_values)
def test_the_request_parser_accepts_or_names_what_was_wrong(body: Any) -> None:
    for model in (dispatch.InvokeToolRequest, dispatch.ValidateCredentialsRequest):
        try:
            parsed = dispatch.parse(model, body)
        except BadRequest as exc:
            assert exc.status in (400, 422) and exc.message
            if exc.status == 422:
                assert exc.errors and all(e["field"] and e["problem"] for e in exc.errors)
                assert exc.message.startswith("invalid request body: ")
        else:
            assert isinstance(body, dict)
            # Checked by hand or by the model, a request is read as the model reads it.
            expected = model.model_validate(body)
            assert parsed.data.model_dump() == expected.data.model_dump()
            assert (parsed.data.provider, getattr(parsed.data, "tool", None)) == (
                expected.data.provider,
                getattr(expected.data, "tool", None),
            )
            for field in ("user_id", "conversation_id", "message_id", "app_id", "endpoint_id", "context"):
                assert getattr(parsed, field) == getattr(expected, field)


def test_no_request_in_this_module_produced_a_server_error(daemon: Daemon) -> None:
    assert "Traceback" not in daemon.log() and " 500 " not in daemon.log()


def _tool_body(**changes: Any) -> dict[str, Any]:
    body: dict[str, Any] = {"user_id": "u", "data": {"provider": "p", "tool": "t", "tool_parameters": {}}}
    for key, value in changes.items():
        if key.startswith("data_"):
            body["data"][key.removeprefix("data_")] = value
        else:
            body[key] = value
    return body


@pytest.mark.parametrize(
    "changes",
    [
        {"data_provider": ""},
        {"data_tool": "x" * 257},
        {"data_provider": 1},
        {"user_id": "u" * 257},
        {"user_id": 7},
        {"conversation_id": 1},
        {"context": []},
        {"data_tool_parameters": []},
        {"data_credentials": "k"},
        {"data_credential_type": 1},
        {"data": None},
    ],
)
def test_a_tool_request_the_model_refuses_is_refused_with_the_models_words(changes: dict[str, Any]) -> None:
    body = _tool_body(**changes)
    with pytest.raises(BadRequest) as refused:
        dispatch.parse(dispatch.InvokeToolRequest, body)
    with pytest.raises(ValidationError) as model_says:
        dispatch.InvokeToolRequest.model_validate(body)
    assert refused.value.status == 422
    assert [e["problem"] for e in refused.value.errors or []] == [e["msg"] for e in model_says.value.errors()]
