"""Remote debugging: an unmodified SDK plugin started with INSTALL_METHOD=remote connects over TCP."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from daemon.testing import Daemon, free_port, parse_sse
from tests.test_runtime import FP, last_error, wait_for

NOTES = "demo/notes"


@pytest.fixture
def remote(
    start: Callable[..., Daemon], fastproto: Callable[..., Path], sdk_plugins_installed: Path
) -> Iterator[tuple[Daemon, int, Callable[[str], subprocess.Popen[bytes]]]]:
    """A daemon serving fastproto locally, and a way to run the notes plugin against it remotely."""
    port = free_port()
    daemon = start(fastproto(), plugin_remote_installing_port=port)
    daemon.wait_ready(FP)
    started: list[subprocess.Popen[bytes]] = []

    def run_notes(key: str) -> subprocess.Popen[bytes]:
        notes = sdk_plugins_installed / "notes"
        env = {
            "PATH": os.environ["PATH"],
            "INSTALL_METHOD": "remote",
            "REMOTE_INSTALL_URL": f"127.0.0.1:{port}",
            "REMOTE_INSTALL_KEY": key,
            "HEARTBEAT_INTERVAL": "1",
        }
        proc = subprocess.Popen(
            [str(notes / ".venv" / "bin" / "python"), "-m", "main"],
            cwd=notes,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        started.append(proc)
        return proc

    yield daemon, port, run_notes
    for proc in started:
        proc.kill()
        proc.wait()


def debugging_key(daemon: Daemon, tenant: str) -> str:
    r = httpx.post(
        f"{daemon.url}/plugin/{tenant}/debugging/key", headers={"X-Api-Key": daemon.key}, timeout=10
    )
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["code"] == 0 and body["message"] == "success"
    return body["data"]["key"]


def listed(daemon: Daemon, tenant: str) -> dict[str, Any]:
    r = httpx.get(f"{daemon.url}/plugins", params={"tenant_id": tenant}, headers={"X-Api-Key": daemon.key})
    r.raise_for_status()
    return {p["plugin_id"]: p for p in r.json()["plugins"]}


def variables(daemon: Daemon, tenant: str, tool: str, **params: str) -> dict[str, Any]:
    events = daemon.invoke(NOTES, tool, params, tenant=tenant)
    assert all(e.ok for e in events), events[-1].raw
    return {
        m["variable_name"]: m["variable_value"]
        for m in (e.message["message"] for e in events if e.message["type"] == "variable")
    }


def test_a_remote_sdk_plugin_is_served_to_its_tenant_while_connected(remote: Any) -> None:
    daemon, _, run_notes = remote
    key = debugging_key(daemon, "tenant-a")
    assert debugging_key(daemon, "tenant-a") == key != debugging_key(daemon, "tenant-b")
    plugin = run_notes(key)
    wait_for(lambda: listed(daemon, "tenant-a").get(NOTES, {}).get("status") == "ready")
    described = listed(daemon, "tenant-a")[NOTES]
    assert described["remote"]["tenant_id"] == "tenant-a"
    assert set(described["providers"]["notes"]["tools"]) == {"save_note", "read_note", "delete_note"}
    assert NOTES not in listed(daemon, "tenant-b")

    # The same request/response protocol over the socket, backwards storage calls included.
    assert variables(daemon, "tenant-a", "save_note", title="plan", body="buy milk") == {"saved": True}
    assert variables(daemon, "tenant-a", "read_note", title="plan") == {"found": True, "body": "buy milk"}
    other = httpx.post(
        daemon.invoke_url("tenant-b"), **daemon.invocation(NOTES, "read_note", {"title": "plan"})
    )
    assert other.status_code == 404

    # A session in flight when the plugin goes away ends at once with upstream's error type.
    os.kill(plugin.pid, signal.SIGSTOP)
    with httpx.Client(timeout=60) as client:
        request = daemon.invocation(NOTES, "read_note", {"title": "plan"})
        with client.stream("POST", daemon.invoke_url("tenant-a"), **request) as response:
            wait_for(lambda: listed(daemon, "tenant-a")[NOTES]["instances"][0]["sessions"] == 1)
            plugin.kill()
            events = parse_sse(response.read())
    error = last_error(events)
    assert error["error_type"] == "ConnectionClosedError"
    wait_for(lambda: NOTES not in listed(daemon, "tenant-a"))
    gone = httpx.post(
        daemon.invoke_url("tenant-a"), **daemon.invocation(NOTES, "read_note", {"title": "plan"})
    )
    assert gone.status_code == 404
    assert daemon.invoke(FP, "emit", {"count": 1}, tenant="tenant-a")[-1].ok


def test_a_wrong_key_is_refused_and_logged(remote: Any) -> None:
    daemon, port, _ = remote
    debugging_key(daemon, "tenant-a")
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        handshake = {"type": "handshake", "data": {"key": "not-the-key"}}
        sock.sendall(json.dumps(handshake).encode() + b"\n")
        reply = b""
        while chunk := sock.recv(4096):
            reply += chunk
    assert reply == b"handshake failed, invalid key\n"
    wait_for(lambda: "refused: handshake failed, invalid key" in daemon.log())
    assert list(listed(daemon, "tenant-a")) == [FP]


def test_connections_are_bounded(remote: Any) -> None:
    daemon, port, _ = remote
    with contextlib.ExitStack() as stack:
        for _ in range(64):  # connected, never registering: each holds a slot until it times out
            stack.enter_context(socket.create_connection(("127.0.0.1", port), timeout=30))
        with socket.create_connection(("127.0.0.1", port), timeout=30) as extra:
            reply = b""
            while chunk := extra.recv(4096):
                reply += chunk
    assert reply == b"server is busy now, please try again later\n"
    assert httpx.get(f"{daemon.url}/health/check", timeout=30).status_code == 200


PROVIDER = [{"identity": {"name": "p"}, "tools": []}]


@pytest.mark.parametrize(
    ("manifest", "tools", "reason"),
    [
        ({"author": "a", "name": "n", "meta": ["not", "an", "object"]}, PROVIDER, "meta must be an object"),
        ({"author": "a", "name": "n", "meta": {"runner": "x"}}, PROVIDER, "meta.runner must be an object"),
        ({"author": "a", "name": "n"}, [{"identity": "oops"}], "provider identity must be an object"),
        ({"author": "a", "name": "n"}, [{"identity": {"name": "p"}, "tools": 5}], "tools must be a list"),
        (
            {"author": "a", "name": "n"},
            [{"identity": {"name": "p"}, "tools": [{"identity": {"name": "t"}, "parameters": 1}]}],
            "tool t: parameters must be a list",
        ),
        ({"author": ["a"], "name": "n"}, PROVIDER, "author missing"),
    ],
)
def test_a_malformed_declaration_is_refused_with_its_reason(
    remote: Any, manifest: dict[str, Any], tools: list[Any], reason: str
) -> None:
    daemon, port, _ = remote
    key = debugging_key(daemon, "tenant-a")
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        for message in (
            {"type": "handshake", "data": {"key": key}},
            {"type": "manifest_declaration", "data": manifest},
            {"type": "tool_declaration", "data": tools},
            {"type": "end", "data": {}},
        ):
            sock.sendall(json.dumps(message).encode() + b"\n")
        reply = b""
        while chunk := sock.recv(4096):  # the daemon answers one line, then closes
            reply += chunk
    assert reply.endswith(f"{reason}\n".encode()), reply
    wait_for(lambda: "refused: remote plugin from 127.0.0.1" in daemon.log())
    assert "Traceback" not in daemon.log()
    assert list(listed(daemon, "tenant-a")) == [FP]


def test_the_number_of_assets_is_bounded(remote: Any) -> None:
    # Tiny assets cost the daemon far more than their bytes: their count is bounded too. The last
    # line sent is the one refused, so the daemon has read everything when it closes.
    daemon, port, _ = remote
    key = debugging_key(daemon, "tenant-a")
    lines = [{"type": "handshake", "data": {"key": key}}]
    lines += [
        {"type": "asset_chunk", "data": {"filename": f"a{i}.txt", "data": "eA=="}} for i in range(10_001)
    ]
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(b"".join(json.dumps(line).encode() + b"\n" for line in lines))
        reply = sock.recv(4096)
    assert reply == b"too many assets, at most 10000 files\n"
    assert list(listed(daemon, "tenant-a")) == [FP]
