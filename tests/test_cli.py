"""The command line, run through the installed console script: the generated server key, start-up
errors, log levels and --help."""

from __future__ import annotations

import os
import pty
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import psutil
import pytest

from daemon.testing import REPO, copy_plugin, free_port

CONSOLE_SCRIPT = str(Path(sys.executable).with_name("plugin-daemon"))


def run_serve(
    tmp_path: Path, *args: str, env: dict[str, str] | None = None, stdout: int = subprocess.PIPE
) -> subprocess.Popen[str]:
    environ = {k: v for k, v in os.environ.items() if not k.startswith(("SERVER_", "PLUGIN"))}
    return subprocess.Popen(
        [CONSOLE_SCRIPT, "serve", "--state-dir", str(tmp_path / "state"), *args],
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
    assert "invalid settings: PLUGIN_INSTANCES: " in out


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    environ = {k: v for k, v in os.environ.items() if not k.startswith(("SERVER_", "PLUGIN", "LOG_LEVEL"))}
    return subprocess.run(
        [CONSOLE_SCRIPT, *args],
        cwd=REPO,
        env={**environ, **(env or {})},
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_an_invalid_environment_value_names_the_variable_and_a_flag_names_the_flag(tmp_path: Path) -> None:
    state = str(tmp_path / "state")
    out = run_cli("serve", "--state-dir", state, env={"SERVER_PORT": "abc"})
    assert out.returncode != 0
    assert "invalid settings: SERVER_PORT: " in out.stderr
    assert "server_port" not in out.stderr and "Traceback" not in out.stderr
    out = run_cli("serve", "--state-dir", state, "--instances", "0")
    assert out.returncode != 0
    assert "invalid settings: --instances: " in out.stderr


def test_a_missing_plugins_directory_or_a_file_stops_the_start(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere"
    afile = tmp_path / "plugins.txt"
    afile.write_text("not a directory")
    for path, said in ((missing, "does not exist"), (afile, "is a file, not a directory")):
        for command in ("serve", "install"):
            out = run_cli(
                command, "--plugins", str(path), *(["--state-dir", str(tmp_path)] * (command == "serve"))
            )
            assert out.returncode != 0, (command, path)
            assert f"plugin-daemon: plugins directory {path} {said}" in out.stderr
            assert "listening" not in out.stderr + out.stdout
            assert "Traceback" not in out.stderr


NOBODY = 65534  # owns the directories below; the command runs without access to them


def unprivileged() -> list[str]:
    """A ``setpriv`` prefix that runs the console script without access to other users' files.

    Its own unprivileged uid when that uid can run the project's interpreter; else (an
    interpreter under a 0700 ``/root``, as pyenv's) root without the capabilities that bypass
    file permissions, which then holds it to them like any other user.
    """
    as_uid = ["setpriv", "--reuid=64000", "--regid=64000", "--clear-groups", "--"]
    if subprocess.run([*as_uid, CONSOLE_SCRIPT, "--help"], capture_output=True).returncode == 0:
        return as_uid
    caps = "-dac_override,-dac_read_search"
    return ["setpriv", f"--bounding-set={caps}", f"--inh-caps={caps}", "--"]


@pytest.mark.skipif(os.geteuid() != 0, reason="sets up directories of another user as root")
def test_an_unreadable_plugins_directory_stops_the_start_with_one_line(tmp_path: Path) -> None:
    root = Path(tempfile.mkdtemp(prefix="cli-", dir="/tmp"))  # searchable by everyone
    try:
        root.chmod(0o755)
        closed = root / "closed"  # the plugins directory itself cannot be read
        (closed / "fastproto").mkdir(parents=True)
        behind = root / "private" / "plugins"  # nor can the directory above it be searched
        behind.mkdir(parents=True)
        for path in (closed, root / "private"):
            os.chown(path, NOBODY, NOBODY)
            path.chmod(0o700)
        environ = {k: v for k, v in os.environ.items() if not k.startswith(("SERVER_", "PLUGIN"))}
        for plugins in (closed, behind):
            for command in ("serve", "install"):
                extra = ["--state-dir", str(root / "state"), "--port", "0"] if command == "serve" else []
                out = subprocess.run(
                    [*unprivileged(), CONSOLE_SCRIPT, command, "--plugins", str(plugins), *extra],
                    cwd="/",
                    env=environ,
                    capture_output=True,
                    text=True,
                    timeout=60,
                )
                assert out.returncode != 0, (command, plugins, out.stderr)
                lines = out.stderr.strip().splitlines()
                assert lines == [f"plugin-daemon: cannot read plugins directory {plugins}: Permission denied"]
                assert "listening" not in out.stdout
    finally:
        subprocess.run(["rm", "-rf", str(root)], check=False)


def test_an_empty_plugins_directory_is_a_warning_and_the_daemon_serves(tmp_path: Path) -> None:
    empty = tmp_path / "plugins"
    empty.mkdir()
    port = free_port()
    proc = run_serve(tmp_path, "--plugins", str(empty), "--port", str(port), env={"SERVER_KEY": "k"})
    try:
        response = wait_until_serving(f"http://127.0.0.1:{port}", "k")
        assert response.status_code == 200
        assert response.json()["plugins"] == []
    finally:
        proc.terminate()
        out = proc.communicate(timeout=30)[0]
    assert f"WARNING daemon: plugins directory {empty} holds no plugin" in out


def test_a_port_in_use_is_one_clear_line_a_failed_exit_and_no_plugin_started(tmp_path: Path) -> None:
    plugins = tmp_path / "plugins"
    plugins.mkdir()
    copy_plugin("fastproto", plugins)
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        proc = run_serve(tmp_path, "--plugins", str(plugins), "--port", str(port), env={"SERVER_KEY": "k"})
        out = proc.communicate(timeout=60)[0]
    assert proc.returncode != 0
    assert (
        out.strip().splitlines()[-1]
        == f"plugin-daemon: cannot listen on 127.0.0.1:{port}: Address already in use"
    )
    assert "listening" not in out
    assert "serving" not in out
    assert "Traceback" not in out
    for process in psutil.process_iter(["cmdline"]):
        assert not any(str(plugins) in part for part in process.info["cmdline"] or []), process.info


def test_listening_is_said_once_bound_with_the_port_really_taken(tmp_path: Path) -> None:
    port = free_port()
    plugins = tmp_path / "plugins"
    plugins.mkdir()
    proc = run_serve(tmp_path, "--plugins", str(plugins), "--port", str(port), env={"SERVER_KEY": "k"})
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            if "listening on" in line:
                break
        assert line.rstrip().endswith(f"INFO daemon: listening on http://127.0.0.1:{port}")
        with socket.create_connection(("127.0.0.1", port), timeout=10):
            pass  # accepted: the socket was bound and listening when the line was written
    finally:
        proc.terminate()
        proc.communicate(timeout=30)


def test_log_level_is_a_flag_of_serve_validated_and_listed(tmp_path: Path) -> None:
    plugins = tmp_path / "plugins"
    plugins.mkdir()
    port = free_port()
    proc = run_serve(
        tmp_path,
        "--plugins",
        str(plugins),
        "--port",
        str(port),
        "--log-level",
        "WARNING",
        env={"SERVER_KEY": "k"},
    )
    try:
        assert wait_until_serving(f"http://127.0.0.1:{port}", "k").status_code == 200
    finally:
        proc.terminate()
        out = proc.communicate(timeout=30)[0]
    assert "WARNING daemon: plugins directory" in out
    assert "INFO" not in out  # the level took effect

    out = run_cli("serve", "--log-level", "loud")
    assert out.returncode == 2
    assert "argument --log-level: invalid choice: 'loud'" in out.stderr
    assert "Traceback" not in out.stderr
    out = run_cli("serve", "--state-dir", str(tmp_path), env={"LOG_LEVEL": "loud"})
    assert out.returncode != 0
    assert out.stderr.strip() == (
        "plugin-daemon: invalid LOG_LEVEL 'loud': use one of debug, info, warning, error, critical"
    )


def test_help_is_plain_text_with_defaults_levels_and_the_environment_only_settings() -> None:
    top = run_cli("--help").stdout
    serve = run_cli("serve", "--help").stdout
    assert "``" not in top + serve
    for shown in (
        "--codec {orjson,json}",
        "default orjson (CODEC)",
        "processes per plugin; default 1 (PLUGIN_INSTANCES)",
        "default 600 (PLUGIN_MAX_EXECUTION_TIMEOUT)",
        "debug, info, warning, error, critical",
        "settings only as environment variables:",
    ):
        assert shown in " ".join(serve.split()), shown
    for variable in (
        "SERVER_KEY",
        "PLUGIN_READY_TIMEOUT",
        "PLUGIN_LIVENESS_TIMEOUT",
        "SESSION_BUFFER_BYTES",
        "LOG_LEVEL",
    ):
        assert f"\n  {variable} " in serve, variable
