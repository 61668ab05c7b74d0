"""The command line: the generated server key and what it refuses."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import httpx

from daemon.testing import REPO, copy_plugin, free_port


def run_serve(tmp_path: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    environ = {k: v for k, v in os.environ.items() if not k.startswith(("SERVER_", "PLUGIN"))}
    return subprocess.Popen(
        [sys.executable, "-m", "daemon", "serve", "--state-dir", str(tmp_path / "state"), *args],
        cwd=REPO,
        env={**environ, **(env or {})},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def test_without_server_key_a_key_is_generated_printed_once_and_stored_0600(tmp_path: Path) -> None:
    plugins = tmp_path / "plugins"
    plugins.mkdir()
    copy_plugin("fastproto", plugins)
    port = free_port()
    proc = run_serve(tmp_path, "--plugins", str(plugins), "--port", str(port))
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line.startswith("Generated server key (stored in ")
        key = line.rsplit(": ", 1)[1].strip()
        key_file = tmp_path / "state" / "server.key"
        assert key_file.read_text().strip() == key
        assert key_file.stat().st_mode & 0o777 == 0o600
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while True:
            try:
                r = httpx.get(f"{url}/plugins", headers={"X-Api-Key": key}, timeout=5)
                break
            except httpx.TransportError:
                assert time.monotonic() < deadline
                time.sleep(0.05)
        assert r.status_code == 200
        assert httpx.get(f"{url}/plugins", headers={"X-Api-Key": "x"}).status_code == 401
    finally:
        proc.terminate()
        out, _ = proc.communicate(timeout=30)
    assert key not in out  # printed once, never logged again
    # A second start reuses the stored key and does not print it.
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
