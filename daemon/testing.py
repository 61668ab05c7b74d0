"""A real daemon subprocess on loopback, and SSE parsing, for tests and benchmarks.

Needs the ``test`` extra (httpx, psutil).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import psutil

from daemon.errors import unwrap

REPO = Path(__file__).resolve().parent.parent
PLUGINS = REPO / "plugins"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def copy_plugin(
    name: str, dest_dir: Path, fault: dict[str, Any] | None = None, *, as_name: str | None = None
) -> Path:
    """A private copy of a bundled plugin (without its venv), optionally with a fault.json.

    ``as_name`` renames the copy (the manifest's ``name``, so the plugin id changes): one
    daemon can then serve a faulty copy beside a healthy one.
    """
    dest = dest_dir / (as_name or name)
    shutil.copytree(PLUGINS / name, dest, ignore=shutil.ignore_patterns(".venv", "__pycache__"))
    if as_name is not None:
        manifest = dest / "manifest.yaml"
        text, renamed = re.subn(r"(?m)^name: .*$", f"name: {as_name}", manifest.read_text(), count=1)
        assert renamed == 1, f"no top-level name in {manifest}"
        manifest.write_text(text)
    if fault is not None:
        (dest / "fault.json").write_text(json.dumps(fault))
    return dest


@dataclass
class Event:
    """One SSE event of an invocation, decoded (errors decoded twice, as upstream nests them)."""

    raw: dict[str, Any]

    @property
    def ok(self) -> bool:
        return self.raw["code"] == 0

    @property
    def message(self) -> dict[str, Any]:
        return self.raw["data"]

    @property
    def envelope(self) -> dict[str, Any]:
        """The daemon-level ``{message, error_type, args}`` (``PluginInvokeError`` for a stream's error)."""
        return json.loads(self.raw["message"])

    @property
    def error(self) -> dict[str, Any]:
        """The most specific error: the plugin's (or validation's) own inside a ``PluginInvokeError``."""
        return unwrap(self.raw["message"])


def parse_sse(body: bytes) -> list[Event]:
    events = []
    for block in body.split(b"\n\n"):
        if not block.strip():
            continue
        assert block.startswith(b"data: "), block[:80]
        events.append(Event(json.loads(block[len(b"data: ") :])))
    return events


class SSEReader:
    """Incremental SSE parsing: an event may span chunks."""

    def __init__(self) -> None:
        self._buffer = b""

    def feed(self, chunk: bytes) -> list[Event]:
        self._buffer += chunk
        *complete, self._buffer = self._buffer.split(b"\n\n")
        return parse_sse(b"\n\n".join(complete) + b"\n\n") if complete else []

    @property
    def pending(self) -> bytes:
        """Bytes of an event not yet complete: non-empty at the end of a body means truncation."""
        return self._buffer


@dataclass
class Daemon:
    proc: subprocess.Popen[bytes]
    url: str
    key: str
    log_path: Path
    children_seen: set[int] = field(default_factory=set)

    def headers(self, plugin_id: str) -> dict[str, str]:
        return {"X-Api-Key": self.key, "X-Plugin-ID": plugin_id, "Content-Type": "application/json"}

    def plugins(self) -> dict[str, Any]:
        r = httpx.get(f"{self.url}/plugins", headers={"X-Api-Key": self.key}, timeout=10)
        r.raise_for_status()
        return {p["plugin_id"]: p for p in r.json()["plugins"]}

    def wait_ready(self, *plugin_ids: str, limit: float = 300.0, instances: int = 1) -> None:
        """Poll until each plugin has ``instances`` ready instances (bounded, not asserted on)."""
        end = time.monotonic() + limit
        while True:
            assert self.proc.poll() is None, f"daemon exited:\n{self.log()}"
            try:
                plugins = self.plugins()
            except httpx.HTTPError:
                plugins = {}
            ready = [
                pid
                for pid in plugin_ids
                if pid in plugins
                and sum(i["state"] == "ready" for i in plugins[pid]["instances"]) >= instances
            ]
            if len(ready) == len(plugin_ids):
                self.record_children()
                return
            if time.monotonic() > end:
                raise AssertionError(f"plugins not ready: {plugins}\n{self.log()}")
            time.sleep(0.05)

    def instance_pids(self, plugin_id: str) -> list[int]:
        return [i["pid"] for i in self.plugins()[plugin_id]["instances"] if i["state"] == "ready"]

    def record_children(self) -> None:
        with contextlib.suppress(psutil.Error):
            self.children_seen |= {c.pid for c in psutil.Process(self.proc.pid).children(recursive=True)}

    def invoke_body(
        self, provider: str, tool: str, params: dict[str, Any] | None = None, **extra: Any
    ) -> dict[str, Any]:
        return {
            "user_id": "u1",
            "data": {"provider": provider, "tool": tool, "tool_parameters": params or {}},
            **extra,
        }

    def invoke_url(self, tenant: str = "t1") -> str:
        return f"{self.url}/plugin/{tenant}/dispatch/tool/invoke"

    def invocation(
        self, plugin_id: str, tool: str, params: dict[str, Any] | None = None, provider: str | None = None
    ) -> dict[str, Any]:
        """``headers`` and ``json`` for an invoke request, to pass to an httpx call."""
        provider = provider or plugin_id.split("/")[1]
        return {"headers": self.headers(plugin_id), "json": self.invoke_body(provider, tool, params)}

    def invoke(
        self,
        plugin_id: str,
        tool: str,
        params: dict[str, Any] | None = None,
        *,
        provider: str | None = None,
        tenant: str = "t1",
        timeout: float = 120,
    ) -> list[Event]:
        r = httpx.post(
            self.invoke_url(tenant), **self.invocation(plugin_id, tool, params, provider), timeout=timeout
        )
        assert r.status_code == 200, r.text
        assert r.headers["content-type"].startswith("text/event-stream")
        return parse_sse(r.content)

    def validate_credentials(
        self, plugin_id: str, credentials: dict[str, Any], *, provider: str | None = None
    ) -> list[Event]:
        body = {"user_id": "u1", "data": {"provider": provider or plugin_id.split("/")[1]}}
        body["data"]["credentials"] = credentials
        r = httpx.post(
            f"{self.url}/plugin/t1/dispatch/tool/validate_credentials",
            headers=self.headers(plugin_id),
            json=body,
            timeout=120,
        )
        assert r.status_code == 200, r.text
        return parse_sse(r.content)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-6000:]

    def stop(self) -> None:
        """SIGTERM, as an operator would; then every plugin process must be gone."""
        self.record_children()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
                raise AssertionError(f"daemon ignored SIGTERM:\n{self.log()}") from None
        deadline = time.monotonic() + 10
        while alive(self.children_seen) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not alive(self.children_seen), f"orphaned plugin processes: {alive(self.children_seen)}"


def alive(pids: set[int]) -> list[int]:
    out = []
    for pid in pids:
        try:
            if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                out.append(pid)
        except psutil.NoSuchProcess:
            pass
    return out


def start_daemon(
    plugins_dir: Path,
    state_dir: Path,
    log_path: Path,
    *,
    source: Path = REPO,
    python: str | None = None,
    **env: Any,
) -> Daemon:
    """Start ``python -m daemon serve`` from ``source`` (another checkout's code, for benchmarks),
    on this interpreter or ``python`` (another venv's, with the daemon's dependencies)."""
    port = free_port()
    key = "test-key-" + os.urandom(6).hex()
    environ = {k: v for k, v in os.environ.items() if not k.startswith(("SERVER_", "PLUGIN_"))}
    environ.update(
        {
            "SERVER_KEY": key,
            "SERVER_PORT": str(port),
            "PLUGIN_REMOTE_INSTALLING_PORT": str(free_port()),  # never the shared default, 5003
            "PLUGINS_DIR": str(plugins_dir),
            "STATE_DIR": str(state_dir),
            **{k.upper(): str(v) for k, v in env.items()},
        }
    )
    log_file = log_path.open("wb")
    proc = subprocess.Popen(
        [python or sys.executable, "-m", "daemon", "serve"],
        cwd=source,
        env=environ,
        stdout=log_file,
        stderr=subprocess.STDOUT,
    )
    daemon = Daemon(proc, f"http://127.0.0.1:{port}", key, log_path)
    deadline = time.monotonic() + 60
    while True:
        assert proc.poll() is None, f"daemon exited:\n{daemon.log()}"
        try:
            if httpx.get(f"{daemon.url}/health/check", timeout=2).status_code == 200:
                return daemon
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError(f"daemon did not come up:\n{daemon.log()}")
        time.sleep(0.05)


@contextlib.contextmanager
def serving(
    tmp: Path, copies: list[tuple[str, dict[str, Any] | None, str | None]], **env: Any
) -> Iterator[Daemon]:
    """A daemon over private copies of bundled plugins (name, fault, renamed as), stopped after."""
    plugins = tmp / "plugins"
    plugins.mkdir()
    for name, fault, as_name in copies:
        copy_plugin(name, plugins, fault, as_name=as_name)
    daemon = start_daemon(plugins, tmp / "state", tmp / "daemon.log", **env)
    try:
        yield daemon
    finally:
        daemon.stop()
