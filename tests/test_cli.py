"""The command line: the generated server key and what it refuses."""

from __future__ import annotations

import os
import pty
import subprocess
import sys
import time
from pathlib import Path

import httpx

from daemon.testing import REPO, copy_plugin, free_port


def run_serve(
    tmp_path: Path, *args: str, env: dict[str, str] | None = None, stdout: int = subprocess.PIPE
) -> subprocess.Popen[str]:
    environ = {k: v for k, v in os.environ.items() if not k.startswith(("SERVER_", "PLUGIN"))}
    return subprocess.Popen(
        [sys.executable, "-m", "daemon", "serve", "--state-dir", str(tmp_path / "state"), *args],
        cwd=REPO,
        env={**environ, **(env or {})},
        stdout=stdout,
        stderr=subprocess.STDOUT,
        text=True,
    )


def wait_until_serving(url: str, key: str) -> httpx.Response:
    deadline = time.monotonic() + 60
    while True:
        try:
            return httpx.get(f"{url}/plugins", headers={"X-Api-Key": key}, timeout=5)
        except httpx.TransportError:
            assert time.monotonic() < deadline
            time.sleep(0.05)


def read_all(fd: int) -> str:
    """Everything a pty's other end wrote, until it closed."""
    chunks = []
    while True:
        try:
            chunk = os.read(fd, 65536)
        except OSError:  # EIO: the child's end is closed
            break
        if not chunk:
            break
        chunks.append(chunk)
    return b"".join(chunks).decode(errors="replace")


def test_without_server_key_a_key_is_generated_shown_once_on_a_terminal_and_stored_0600(
    tmp_path: Path,
) -> None:
    plugins = tmp_path / "plugins"
    plugins.mkdir()
    copy_plugin("fastproto", plugins)
    port = free_port()
    controller, terminal = pty.openpty()
    proc = run_serve(tmp_path, "--plugins", str(plugins), "--port", str(port), stdout=terminal)
    os.close(terminal)
    try:
        first = b""
        while not first.endswith(b"\n"):
            first += os.read(controller, 1)
        line = first.decode().strip()
        assert line.startswith("Generated server key (stored in ")
        key = line.rsplit(": ", 1)[1]
        key_file = tmp_path / "state" / "server.key"
        assert key_file.read_text().strip() == key
        assert key_file.stat().st_mode & 0o777 == 0o600
        url = f"http://127.0.0.1:{port}"
        assert wait_until_serving(url, key).status_code == 200
        assert httpx.get(f"{url}/plugins", headers={"X-Api-Key": "x"}).status_code == 401
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        rest = read_all(controller)
        os.close(controller)
    assert key not in rest  # shown once, never again
    # A second start reuses the stored key and does not show it.
    proc = run_serve(tmp_path, "--plugins", str(plugins), "--port", str(free_port()))
    assert proc.stdout is not None
    seen = []
    for line in proc.stdout:
        seen.append(line)
        if "using the server key stored in" in line:
            break
    proc.terminate()
    out = "".join(seen) + proc.communicate(timeout=30)[0]
    assert "using the server key stored in" in out
    assert key not in out


def test_a_generated_key_is_not_written_to_a_log(tmp_path: Path) -> None:
    """Under systemd or in a container stdout is a log: the key stays in its file."""
    plugins = tmp_path / "plugins"
    plugins.mkdir()
    copy_plugin("fastproto", plugins)
    port = free_port()
    proc = run_serve(tmp_path, "--plugins", str(plugins), "--port", str(port))
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        key_file = tmp_path / "state" / "server.key"
        assert line.startswith(f"Generated server key, stored in {key_file} (mode 0600); not shown")
        key = key_file.read_text().strip()
        assert wait_until_serving(f"http://127.0.0.1:{port}", key).status_code == 200
    finally:
        proc.terminate()
        out = line + proc.communicate(timeout=30)[0]
    assert key not in out


def test_binding_a_public_address_without_a_key_is_refused(tmp_path: Path) -> None:
    proc = run_serve(tmp_path, "--host", "0.0.0.0")
    out, _ = proc.communicate(timeout=30)
    assert proc.returncode != 0
    assert "refusing to bind 0.0.0.0 without SERVER_KEY" in out


def test_invalid_settings_are_reported_by_name(tmp_path: Path) -> None:
    proc = run_serve(tmp_path, env={"SERVER_KEY": "k", "PLUGIN_INSTANCES": "0"})
    out, _ = proc.communicate(timeout=30)
    assert proc.returncode != 0
    assert "invalid settings: plugin_instances" in out
