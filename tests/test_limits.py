"""Drills: what a hostile client can hold (bytes, descriptors, time) is bounded.

Raw sockets, because the point is what a client that does not behave like httpx can do.
The time bounds only say "did not hang": each limit under test is seconds, the bound minutes.
"""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

import httpx

from daemon.testing import Daemon
from tests.test_runtime import FP


@contextmanager
def connection(daemon: Daemon, *, rcvbuf: int | None = None) -> Iterator[socket.socket]:
    host, port = daemon.url.removeprefix("http://").split(":")
    sock = socket.socket()
    if rcvbuf is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.settimeout(60)
    sock.connect((host, int(port)))
    try:
        yield sock
    finally:
        sock.close()


def response_head(sock: socket.socket) -> bytes:
    """What the server answers before it closes (or the first 64 KiB of it)."""
    data = b""
    while len(data) < 65536:
        try:
            chunk = sock.recv(65536)
        except ConnectionResetError:
            break
        if not chunk:
            break
        data += chunk
        if b"\r\n\r\n" in data and b"connection: close" not in data.lower():
            break
    return data


def until(condition: Callable[[], bool], limit: float = 60) -> None:
    deadline = time.monotonic() + limit
    while not condition():
        assert time.monotonic() < deadline, "did not happen"
        time.sleep(0.1)


def sessions(daemon: Daemon, plugin: str = FP) -> int:
    return sum(i["sessions"] for i in daemon.plugins()[plugin]["instances"])


def test_an_oversized_request_head_is_refused_as_it_arrives(
    start: Callable[..., Daemon], fastproto: Callable[..., Path]
) -> None:
    daemon = start(fastproto(), server_max_header_bytes=8192)
    with connection(daemon) as sock:
        sock.sendall(b"GET /plugins HTTP/1.1\r\nHost: x\r\nX-Plugin-ID: " + b"a" * 20000 + b"\r\n\r\n")
        answer = response_head(sock)
    assert answer.startswith(b"HTTP/1.1 431 "), answer[:200]
    assert b"request head larger than 8192 bytes" in answer
    # 16 MiB: refused after the first 8 KiB, nothing kept; the daemon hangs up mid-send.
    with connection(daemon) as sock, suppress(OSError):
        sock.sendall(b"GET /health/check HTTP/1.1\r\nX-Plugin-ID: " + b"a" * (16 << 20))
    assert httpx.get(f"{daemon.url}/health/check", timeout=30).status_code == 200


def test_every_body_is_bounded_debug_login_included(
    start: Callable[..., Daemon], fastproto: Callable[..., Path]
) -> None:
    daemon = start(fastproto(), max_request_body_bytes=65536)
    for path in ("/debug/login", "/plugin/t1/dispatch/tool/invoke"):
        with connection(daemon) as sock:  # announces 300 MiB, sends a little, waits for the answer
            sock.sendall(
                f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/x-www-form-urlencoded\r\n"
                f"Content-Length: {300 << 20}\r\n\r\n".encode()
                + b"key="
                + b"k" * 1000
            )
            answer = response_head(sock)
        assert answer.startswith(b"HTTP/1.1 413 "), (path, answer[:300])
    # Without a length: the body is counted as it arrives.
    body = (b"k" * 70000 for _ in range(1))
    r = httpx.post(f"{daemon.url}/debug/login", content=body, timeout=30)
    assert r.status_code == 413 and "larger than 65536 bytes" in r.json()["message"]


def test_idle_and_trickling_connections_are_closed_and_connections_are_capped(
    start: Callable[..., Daemon], fastproto: Callable[..., Path]
) -> None:
    daemon = start(fastproto(), server_request_read_timeout=2, server_max_connections=20)
    host, port = daemon.url.removeprefix("http://").split(":")
    idle = [socket.create_connection((host, int(port)), timeout=60) for _ in range(25)]
    try:
        # Over the cap, a request is answered 503 at once instead of waiting for a slot, in
        # upstream's envelope, and its connection closed.
        for path in ("/health/check", "/plugin/t1/dispatch/tool/invoke"):
            r = httpx.request("GET" if path == "/health/check" else "POST", f"{daemon.url}{path}", timeout=30)
            assert r.status_code == 503 and r.headers["connection"] == "close", path
            error = json.loads(r.json()["message"])
            assert error["error_type"] == "PluginDaemonInternalServerError", path
            assert error["message"] == "the daemon serves at most 20 connections at once"
        for sock in idle:  # each idle connection is answered 408 and closed
            assert response_head(sock).startswith(b"HTTP/1.1 408 ")
    finally:
        for sock in idle:
            sock.close()
    assert httpx.get(f"{daemon.url}/health/check", timeout=30).status_code == 200
    with connection(daemon) as sock:  # slowloris: a header byte at a time never completes a request
        sock.sendall(b"GET /health/check HTTP/1.1\r\nX-Slow: ")
        deadline = time.monotonic() + 60
        closed = False
        while time.monotonic() < deadline and not closed:
            try:
                sock.sendall(b"a")
            except OSError:
                closed = True
                break
            sock.settimeout(0.3)
            with suppress(TimeoutError):
                closed = sock.recv(4096).startswith(b"HTTP/1.1 408 ") or closed
        assert closed, "a trickling client kept its connection"


def invoke_without_reading(daemon: Daemon, sock: socket.socket, params: dict[str, object]) -> None:
    body = json.dumps(daemon.invoke_body("fastproto", "emit", params)).encode()
    head = f"POST /plugin/t1/dispatch/tool/invoke HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}\r\n"
    head += "".join(f"{k}: {v}\r\n" for k, v in daemon.headers(FP).items())
    sock.sendall(head.encode() + b"\r\n" + body)


def test_a_client_that_stops_reading_holds_its_session_for_a_bounded_time(
    start: Callable[..., Daemon], fastproto: Callable[..., Path]
) -> None:
    daemon = start(fastproto(), client_write_timeout=2, session_buffer_bytes=64 << 20)
    daemon.wait_ready(FP)
    with connection(daemon, rcvbuf=4096) as sock:
        invoke_without_reading(daemon, sock, {"count": 400, "size": 65536})
        until(lambda: sessions(daemon) == 1)
        until(lambda: sessions(daemon) == 0)  # ended although the client never read or left
    assert "Traceback" not in daemon.log()
    assert all(e.ok for e in daemon.invoke(FP, "emit", {"count": 3}))


def test_the_bytes_buffered_for_slow_clients_are_bounded_across_sessions(
    start: Callable[..., Daemon], fastproto: Callable[..., Path]
) -> None:
    limit = 4 << 20
    daemon = start(
        fastproto(), client_write_timeout=3, session_buffer_bytes=64 << 20, session_buffer_total_bytes=limit
    )
    daemon.wait_ready(FP)
    with connection(daemon, rcvbuf=4096) as a, connection(daemon, rcvbuf=4096) as b:
        invoke_without_reading(daemon, a, {"count": 200, "size": 65536})
        invoke_without_reading(daemon, b, {"count": 200, "size": 65536})
        until(lambda: "buffers for slow clients are full" in daemon.log())
        until(lambda: sessions(daemon) == 0)
    metrics = httpx.get(f"{daemon.url}/metrics", timeout=30).text
    assert 'plugin_session_buffer_bytes{instance="0",plugin_id="demo/fastproto"} 0.0' in metrics
    assert all(e.ok for e in daemon.invoke(FP, "emit", {"count": 3}))


def _answer(sock: socket.socket) -> bytes:
    """One chunked answer, read to its end; the connection stays open."""
    data = b""
    while not data.endswith(b"0\r\n\r\n"):
        chunk = sock.recv(65536)
        assert chunk, data
        data += chunk
    return data


def _until_closed(sock: socket.socket) -> tuple[bytes, float]:
    """What the server sends until it closes the connection, and when it closed it."""
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    return data, time.monotonic()


def _answers_spaced_out(daemon: Daemon, sock: socket.socket) -> float:
    """Three invocations on one connection, 0.4 s apart, so that a deadline set by an earlier
    answer instead of the last would expire first; returns when the last was sent."""
    for n in range(3):
        time.sleep(0.4 * (n > 0))
        sent = time.monotonic()
        invoke_without_reading(daemon, sock, {"count": 1})
        assert _answer(sock).startswith(b"HTTP/1.1 200 ")
    return sent


def test_after_an_answer_a_connection_waits_the_keep_alive_time_then_closes_without_a_word(
    start: Callable[..., Daemon], fastproto: Callable[..., Path]
) -> None:
    daemon = start(fastproto(), server_keep_alive_timeout=1, server_request_read_timeout=30)
    daemon.wait_ready(FP)
    with connection(daemon) as sock:
        sent = _answers_spaced_out(daemon, sock)
        data, closed = _until_closed(sock)
    assert data == b"" and closed - sent >= 1  # never before the keep-alive time after the last


def test_after_an_answer_a_request_not_received_in_time_is_answered_408(
    start: Callable[..., Daemon], fastproto: Callable[..., Path]
) -> None:
    daemon = start(fastproto(), server_keep_alive_timeout=30, server_request_read_timeout=1)
    daemon.wait_ready(FP)
    with connection(daemon) as sock:
        sent = _answers_spaced_out(daemon, sock)
        sock.sendall(b"GET /health/check HTTP/1.1\r\nHost: x\r\n")  # a head that never ends
        data, closed = _until_closed(sock)
    assert data.startswith(b"HTTP/1.1 408 ") and closed - sent >= 1
