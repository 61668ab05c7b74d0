"""Dispatch served directly by the HTTP protocol answers exactly as the ASGI application does.

Two daemons over the same plugin, one with ``SERVER_DIRECT_DISPATCH`` (the default) and one
without; every request below goes to both and the answers are compared: status, headers
(but the date) and body. Then what only a connection shows: pipelined requests, keep-alive,
``Connection: close``, and a client that leaves (one that stops reading: tests/test_limits.py).
"""

from __future__ import annotations

import json
import re
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest

from daemon.testing import Daemon, copy_plugin, parse_sse, start_daemon
from tests.test_runtime import FP

FASTPROTO = {"provider": "fastproto", "tool": "emit"}


def _start(tmp: Path, **settings: Any) -> Daemon:
    (tmp / "plugins").mkdir()
    copy_plugin("fastproto", tmp / "plugins")
    daemon = start_daemon(tmp / "plugins", tmp / "state", tmp / "daemon.log", **settings)
    daemon.wait_ready(FP)
    return daemon


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Daemon, Daemon]]:
    settings = {"max_request_body_bytes": 65536, "otel_traces_sampler": "always_on"}
    direct = _start(tmp_path_factory.mktemp("direct"), **settings)
    asgi = _start(tmp_path_factory.mktemp("asgi"), server_direct_dispatch="false", **settings)
    yield direct, asgi
    direct.stop()
    asgi.stop()


def _tool(**parameters: Any) -> dict[str, Any]:
    return {"user_id": "u", "data": {**FASTPROTO, "tool_parameters": parameters}}


def _nested(levels: int) -> Any:
    value: Any = 0
    for _ in range(levels):
        value = [value]
    return value


# (path below /plugin/, headers to change (None removes), body as JSON or bytes)
CASES: list[tuple[str, dict[str, str | None], Any]] = [
    ("t1/dispatch/tool/invoke", {}, _tool()),
    ("t1/dispatch/tool/invoke", {}, _tool(count=20, variables=4)),
    ("t1/dispatch/tool/invoke", {}, _tool(count=3, size=70000)),
    ("t1/dispatch/tool/invoke", {}, _tool(violate=True)),
    ("t1/dispatch/tool/invoke", {}, _tool(stream_chunks=5)),
    ("t1/dispatch/tool/invoke", {}, _tool(count=2, error_at=1)),
    ("t1/dispatch/tool/invoke", {}, _tool(count=2, crash_at=1)),
    ("t1/dispatch/tool/invoke", {}, {"user_id": "u", "data": {"provider": "fastproto", "tool": "nope"}}),
    ("t1/dispatch/tool/invoke", {}, {"user_id": "u", "data": {"provider": "fastproto", "tool": 3}}),
    ("t1/dispatch/tool/invoke", {}, {"data": {**FASTPROTO, "tool_parameters": [1]}}),
    ("t1/dispatch/tool/invoke", {}, b'{"user_id": "u", "data": {"provider": "fas'),
    ("t1/dispatch/tool/invoke", {}, b"[1, 2]"),
    ("t1/dispatch/tool/invoke", {}, _tool(deep=_nested(300))),
    ("t1/dispatch/tool/invoke", {}, _tool(deep=_nested(248))),
    ("t1/dispatch/tool/invoke", {}, b""),
    ("t1/dispatch/tool/invoke", {}, b"x" * 70000),
    ("t1/dispatch/tool/invoke", {"content-type": "text/plain"}, _tool()),
    ("t1/dispatch/tool/invoke", {"content-type": None}, _tool()),
    ("t1/dispatch/tool/invoke", {"x-api-key": None}, _tool()),
    ("t1/dispatch/tool/invoke", {"x-api-key": "wrong"}, _tool()),
    ("t1/dispatch/tool/invoke", {"x-plugin-id": None}, _tool()),
    ("t1/dispatch/tool/invoke", {"x-plugin-id": "demo/absent"}, _tool()),
    ("t1/dispatch/tool/invoke", {"x-plugin-id": "not a plugin"}, _tool()),
    ("t1/dispatch/tool/invoke", {"x-plugin-id": "demo/fastproto:0.1.0@0123abcd"}, _tool()),
    ("bad%20tenant/dispatch/tool/invoke", {}, _tool()),
    ("t%31/dispatch/tool/invoke", {}, _tool()),
    ("t1/dispatch/tool/validate_credentials", {}, {"user_id": "u", "data": {"provider": "fastproto"}}),
    ("t1/dispatch/tool/validate_credentials", {}, {"user_id": "u", "data": {"credentials": []}}),
    ("t1/dispatch/tool/get_runtime_parameters", {}, {"user_id": "u", "data": FASTPROTO}),
    ("t1/dispatch/llm/invoke", {}, {"user_id": "u", "data": {"provider": "p", "model": "m"}}),
    ("t1/dispatch/model/polling/check", {}, {"user_id": "u", "data": {"provider": "p"}}),
    ("t1/dispatch/nope", {}, _tool()),
]


def _request(daemon: Daemon, path: str, changes: dict[str, str | None], body: Any) -> httpx.Response:
    headers: dict[str, str] = {**daemon.headers(FP), "content-type": "application/json"}
    for name, value in changes.items():
        headers.pop(name, None)
        headers.pop(name.title(), None)
        headers.pop(
            "X-Api-Key" if name == "x-api-key" else "X-Plugin-ID" if name == "x-plugin-id" else name, None
        )
        if value is not None:
            headers[name] = value
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    return httpx.post(f"{daemon.url}/plugin/{path}", headers=headers, content=content, timeout=60)


def _comparable(r: httpx.Response) -> tuple[int, list[tuple[str, str]], str]:
    headers = [(k, v) for k, v in r.headers.multi_items() if k != "date"]
    # A session id is random per invocation and each daemon has its own directory; the rest
    # of the body must match exactly.
    body = re.sub(r"[0-9a-f]{32}", "<id>", r.text)
    body = re.sub(r"/(direct|asgi)0/", "/<dir>/", body)
    return r.status_code, headers, body


@pytest.mark.parametrize(("path", "changes", "body"), CASES)
def test_both_paths_give_the_same_answer(
    pair: tuple[Daemon, Daemon], path: str, changes: dict[str, str | None], body: Any
) -> None:
    direct, asgi = pair
    answer = _comparable(_request(direct, path, changes, body))
    assert answer == _comparable(_request(asgi, path, changes, body))


def test_an_invocation_is_answered_as_before(pair: tuple[Daemon, Daemon]) -> None:
    direct, _ = pair
    r = _request(direct, "t1/dispatch/tool/invoke", {}, _tool(count=2, variables=1))
    assert r.status_code == 200 and r.headers["content-type"] == "text/event-stream"
    assert r.headers["transfer-encoding"] == "chunked"
    events = parse_sse(r.content)
    assert [e.message["type"] for e in events] == ["text", "text", "variable", "variable"]


def test_a_body_nested_deeper_than_the_plugin_can_be_sent_is_a_bad_request(
    pair: tuple[Daemon, Daemon],
) -> None:
    direct, _ = pair
    # body, data, tool_parameters, then the lists: 3 + 247 levels pass, 3 + 248 do not.
    r = _request(direct, "t1/dispatch/tool/invoke", {}, _tool(deep=_nested(247)))
    events = parse_sse(r.content)
    assert r.status_code == 200 and events and all(e.ok for e in events)  # the plugin answered
    for levels in (248, 300, 1000):
        r = _request(direct, "t1/dispatch/tool/invoke", {}, _tool(deep=_nested(levels)))
        assert r.status_code == 400, levels
        error = json.loads(r.json()["message"])
        assert error["error_type"] == "PluginDaemonBadRequestError"
        assert error["message"] == "request body nested deeper than 250 levels"
    assert _sessions(direct) == 0


def _raw_request(daemon: Daemon, body: dict[str, Any], *, close: bool = False) -> bytes:
    content = json.dumps(body).encode()
    headers = {**daemon.headers(FP), "content-type": "application/json", "content-length": str(len(content))}
    if close:
        headers["connection"] = "close"
    head = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
    return f"POST /plugin/t1/dispatch/tool/invoke HTTP/1.1\r\nhost: x\r\n{head}\r\n".encode() + content


def _read_until_closed(sock: socket.socket) -> bytes:
    sock.settimeout(60)
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    return data


def test_pipelined_requests_are_answered_in_order_on_one_connection(pair: tuple[Daemon, Daemon]) -> None:
    direct, _ = pair
    host, port = direct.url.removeprefix("http://").split(":")
    requests = [_raw_request(direct, _tool(count=n, delay_ms=30 if n == 1 else 0)) for n in (1, 2)]
    requests.append(_raw_request(direct, _tool(count=3), close=True))
    with socket.create_connection((host, int(port))) as sock:
        sock.sendall(b"".join(requests))
        data = _read_until_closed(sock)
    answers = data.split(b"HTTP/1.1 200 OK\r\n")[1:]
    assert len(answers) == 3, data[:2000]
    texts = [a.count(b'"type":"text"') for a in answers]
    assert texts == [1, 2, 3]
    assert all(a.endswith(b"0\r\n\r\n") for a in answers)
    assert b"connection: close" in answers[2] and b"connection: close" not in answers[0]


def _sessions(daemon: Daemon) -> int:
    return sum(i["sessions"] for i in daemon.plugins()[FP]["instances"])


def _wait_for(condition: Any, what: str) -> None:
    deadline = time.monotonic() + 30  # generous: only says the daemon did not hang
    while not condition():
        assert time.monotonic() < deadline, what
        time.sleep(0.05)


def test_a_client_that_leaves_ends_its_session(pair: tuple[Daemon, Daemon]) -> None:
    direct, _ = pair
    host, port = direct.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port))) as sock:
        sock.sendall(_raw_request(direct, _tool(hang=True)))
        _wait_for(lambda: _sessions(direct) == 1, "the session never started")
    _wait_for(lambda: _sessions(direct) == 0, "the session outlived its client")
    assert _request(direct, "t1/dispatch/tool/invoke", {}, _tool()).status_code == 200


def test_the_head_leaves_before_a_slow_plugin_answers(pair: tuple[Daemon, Daemon]) -> None:
    """The head waits for the first events only briefly: a caller learns its request was taken."""
    direct, _ = pair
    with httpx.Client(timeout=30) as client:  # generous: only says the head did not wait for the plugin
        request = {"headers": {**direct.headers(FP), "content-type": "application/json"}}
        body = json.dumps(_tool(hang=True)).encode()
        url = f"{direct.url}/plugin/t1/dispatch/tool/invoke"
        with client.stream("POST", url, content=body, **request) as response:
            assert response.status_code == 200
            assert response.headers["content-type"] == "text/event-stream"
            assert _sessions(direct) == 1


# Drills against both paths: what a client that does not behave can make either one do.


def _connect(daemon: Daemon) -> socket.socket:
    host, port = daemon.url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)))
    sock.settimeout(60)  # generous: only says the daemon did not hang
    return sock


def _read_answer_and_close(sock: socket.socket) -> bytes:
    data = b""
    try:
        while chunk := sock.recv(65536):
            data += chunk
    except ConnectionResetError:
        pass
    return data


def _head(daemon: Daemon, path: str = "/plugin/t1/dispatch/tool/invoke", **changes: str) -> bytes:
    fields = {k.lower(): v for k, v in daemon.headers(FP).items()}
    fields.update({"content-type": "application/json", **changes})
    lines = "".join(f"{k}: {v}\r\n" for k, v in fields.items())
    return f"POST {path} HTTP/1.1\r\nhost: x\r\n{lines}\r\n".encode()


def _without_date(answer: bytes) -> bytes:
    return re.sub(rb"date: [^\r]*\r\n", b"", answer)


def test_a_chunked_body_over_the_limit_is_refused_and_the_connection_closed(
    pair: tuple[Daemon, Daemon],
) -> None:
    """As a declared length over the limit: 413, and the rest of the body is not read."""
    answers = []
    for daemon in pair:
        with _connect(daemon) as sock:
            sock.sendall(_head(daemon, **{"transfer-encoding": "chunked"}) + b"%x\r\n" % 70000 + b"x" * 70000)
            # The client would go on sending; the daemon hangs up instead of reading on.
            answers.append(_without_date(_read_answer_and_close(sock)))
    direct, asgi = answers
    assert direct.startswith(b"HTTP/1.1 413 ") and b"connection: close" in direct, direct
    assert b"request body larger than 65536 bytes" in direct
    assert direct == asgi


@pytest.fixture(scope="module")
def strict(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Daemon]]:
    """Both paths with short client deadlines, for the drills that wait for them."""
    settings = {"max_request_body_bytes": 65536, "server_request_read_timeout": 2, "client_write_timeout": 2}
    daemons = {
        "direct": _start(tmp_path_factory.mktemp("direct"), **settings),
        "asgi": _start(tmp_path_factory.mktemp("asgi"), server_direct_dispatch="false", **settings),
    }
    yield daemons
    for daemon in daemons.values():
        daemon.stop()


@pytest.mark.parametrize("path", ["direct", "asgi"])
def test_a_body_that_trails_a_refusal_does_not_hold_the_connection(
    strict: dict[str, Daemon], path: str
) -> None:
    """Refused on its head (401), the request's body comes after the answer; then nothing.
    The connection is still held to the read deadline, as any other that sends nothing."""
    daemon = strict[path]
    body = json.dumps(_tool()).encode()
    with _connect(daemon) as sock:
        sock.sendall(_head(daemon, **{"x-api-key": "wrong", "content-length": str(len(body))}) + body[:10])
        answer = b""
        while not answer.endswith(b'"data":null}') and (chunk := sock.recv(65536)):
            answer += chunk
        assert answer.startswith(b"HTTP/1.1 401 ")
        sock.sendall(body[10:])
        rest = _read_answer_and_close(sock)  # did not hang
    assert rest.startswith(b"HTTP/1.1 408 "), rest


@pytest.fixture(scope="module")
def faulty(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    """A daemon whose sessions fail as they open when asked to (tests/faults/sitecustomize.py)."""
    faults = Path(__file__).parent / "faults"
    daemon = _start(tmp_path_factory.mktemp("faulty"), pythonpath=faults, daemon_test_fault="open_session")
    yield daemon
    daemon.stop()


def test_a_failure_before_the_stream_has_left_is_answered_500_and_the_connection_kept(
    faulty: Daemon,
) -> None:
    """A bug that fails the handler as the session opens, before the event-stream head has left:
    the answer is a 500 in upstream's envelope, not a connection cut with nothing (the ASGI path
    has sent its head by then and can only cut)."""
    direct = faulty
    text = json.dumps(_tool(fail_open=True)).encode()
    logged = direct.log().count("unhandled error in POST")
    with _connect(direct) as sock:
        sock.sendall(_head(direct, **{"content-length": str(len(text))}) + text)
        answer = b""
        while not answer.endswith(b'"data":null}') and (chunk := sock.recv(65536)):
            answer += chunk
        assert answer.startswith(b"HTTP/1.1 500 "), answer
        envelope = json.loads(answer.split(b"\r\n\r\n", 1)[1])
        assert envelope["code"] == -500 and envelope["data"] is None
        assert direct.log().count("unhandled error in POST") == logged + 1  # logged, with its traceback
        assert "fault injected by the test" in direct.log()
        good = json.dumps(_tool()).encode()  # the same connection serves the next request
        sock.sendall(_head(direct, connection="close", **{"content-length": str(len(good))}) + good)
        rest = _read_answer_and_close(sock)
    assert rest.startswith(b"HTTP/1.1 200 ") and rest.endswith(b"0\r\n\r\n"), rest


@pytest.mark.parametrize("path", ["direct", "asgi"])
@pytest.mark.parametrize(
    "output",
    [
        {"count": 100, "size": 65536},  # stalls mid-stream (within the session's buffer)
        {"count": 1, "size": 4_000_000},  # one event past the socket's buffers, then the end
    ],
)
def test_a_client_that_stops_reading_loses_its_connection_not_only_its_session(
    strict: dict[str, Daemon], path: str, output: dict[str, int]
) -> None:
    """Past CLIENT_WRITE_TIMEOUT the stream is given up and the socket closed at once: a close
    that waited for the unread buffer to drain would hold the descriptor as long as the client."""
    daemon = strict[path]
    logged = daemon.log().count("without completing response")
    body = json.dumps(_tool(**output)).encode()
    host, port = daemon.url.removeprefix("http://").split(":")
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.connect((host, int(port)))
        sock.sendall(_head(daemon, **{"content-length": str(len(body))}) + body)
        mine = sock.getsockname()[1]

        def held() -> bool:
            connections = psutil.Process(daemon.proc.pid).net_connections()
            return any(c.raddr and c.raddr.port == mine for c in connections)

        _wait_for(held, "the connection was never accepted")
        _wait_for(lambda: not held(), "the daemon kept the connection of a client that stopped reading")
        assert _sessions(daemon) == 0
    assert _request(daemon, "t1/dispatch/tool/invoke", {}, _tool()).status_code == 200
    assert daemon.log().count("without completing response") == logged  # a disconnect, not an error


@pytest.mark.parametrize("path", ["direct", "asgi"])
def test_a_client_that_leaves_with_requests_queued_ends_the_running_session(
    pair: tuple[Daemon, Daemon], path: str
) -> None:
    """The request whose stream runs hears of the lost connection, not only the last one queued
    behind it; else its session would run on for nobody, a slot no connection limit counts."""
    daemon = pair[0] if path == "direct" else pair[1]
    with _connect(daemon) as sock:
        sock.sendall(_raw_request(daemon, _tool(hang=True)) + _raw_request(daemon, _tool()))
        _wait_for(lambda: _sessions(daemon) == 1, "the session never started")
    _wait_for(lambda: _sessions(daemon) == 0, "the session outlived its client")
