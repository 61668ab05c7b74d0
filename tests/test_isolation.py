"""Drills: what a plugin process can reach of the daemon (real daemon, real plugin processes).

A probe plugin (fastproto behind a shim) reports from inside its own process what it can
read: the daemon's environment, the key file, the storage database, and ``/metrics``
over loopback. Its report goes to stderr, which the daemon forwards to its log.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest

from daemon.testing import REPO, Daemon, copy_plugin

PROBE = "demo/probe"
FASTPROTO = "demo/fastproto"
PROBE_SHIM = '''"""Wait for probe.json, try to reach the daemon's secrets, report on stderr, then serve."""

import json
import os
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import main


def attempt(what):
    try:
        what()
        return "read"
    except urllib.error.HTTPError as exc:
        return f"http {exc.code}"
    except OSError as exc:
        return type(exc).__name__


DETACHED = """
import os, sys, time, urllib.error, urllib.request
if os.fork():
    os._exit(0)  # the grandchild is orphaned: no longer a descendant of the daemon
os.setsid()
time.sleep(0.5)
try:
    urllib.request.urlopen(sys.argv[1], timeout=10).read()
    result = "read"
except urllib.error.HTTPError as exc:
    result = f"http {exc.code}"
except OSError as exc:
    result = type(exc).__name__
with open("detached.out.new", "w") as out:
    out.write(result)
os.replace("detached.out.new", "detached.out")
"""


def detached(url):
    """What a process the plugin started and detached from itself gets from ``url``."""
    subprocess.run([sys.executable, "-c", DETACHED, url], check=True)
    for _ in range(300):
        if os.path.exists("detached.out"):
            return open("detached.out").read()
        time.sleep(0.1)
    return "no answer"


def probe():
    while not os.path.exists("probe.json"):
        time.sleep(0.1)
    config = json.load(open("probe.json"))
    environ = []
    report = {
        "uid": os.getuid(),
        "environ": attempt(lambda: environ.append(open(f"/proc/{os.getppid()}/environ", "rb").read())),
        "key_file": attempt(lambda: open(config["state"] + "/server.key").read()),
        "storage": attempt(lambda: open(config["state"] + "/state.sqlite3", "rb").read()),
        "metrics": attempt(lambda: urllib.request.urlopen(config["url"] + "/metrics", timeout=10).read()),
        "metrics_detached": detached(config["url"] + "/metrics"),
    }
    report["key_in_environ"] = bool(environ) and config["key"].encode() in environ[0]
    print("PROBE " + json.dumps(report), file=sys.stderr, flush=True)


threading.Thread(target=probe, daemon=True).start()
main.main()
'''


def probe_plugins(root: Path) -> Path:
    plugins = root / "plugins"
    plugins.mkdir()
    probe = copy_plugin("fastproto", plugins, as_name="probe")
    (probe / "probe.py").write_text(PROBE_SHIM)
    manifest = probe / "manifest.yaml"
    manifest.write_text(manifest.read_text().replace("entrypoint: main", "entrypoint: probe"))
    return plugins


def run_probe(daemon: Daemon, plugins: Path, state: Path) -> dict[str, Any]:
    daemon.wait_ready(PROBE)
    config = {"url": daemon.url, "state": str(state), "key": daemon.key}
    staged = plugins / "probe" / "probe.json.new"
    staged.write_text(json.dumps(config))
    staged.chmod(0o644)
    staged.replace(plugins / "probe" / "probe.json")  # whole, or not at all
    deadline_log = ""
    for _ in range(600):
        deadline_log = daemon.log_path.read_text(errors="replace")
        found = re.search(r"PROBE (\{.*\})", deadline_log)
        if found:
            return json.loads(found.group(1))
        subprocess.run(["sleep", "0.1"], check=True)
    raise AssertionError(f"the probe never reported:\n{daemon.log()}")


def test_a_plugin_of_the_same_user_cannot_read_the_key_from_the_daemon_nor_use_metrics(
    start: Callable[..., Daemon], tmp_path: Path
) -> None:
    plugins = probe_plugins(tmp_path)
    daemon = start(plugins)
    report = run_probe(daemon, plugins, tmp_path / "state0")
    assert report["key_in_environ"] is False  # the daemon blanked SERVER_KEY once read
    assert report["metrics"] == "http 401"  # a loopback client, but a plugin: it needs the key
    assert report["metrics_detached"] == "http 401"  # so does a process it started and orphaned
    environ = Path(f"/proc/{daemon.proc.pid}/environ").read_bytes()
    assert daemon.key.encode() not in environ


def test_the_daemon_makes_itself_non_dumpable() -> None:
    code = (
        "import ctypes, os; os.environ['SERVER_KEY'] = 'x';"
        "from daemon.isolation import harden_daemon; harden_daemon();"
        "libc = ctypes.CDLL(None); print(libc.prctl(3, 0, 0, 0, 0), 'SERVER_KEY' in os.environ)"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["0", "False"]  # PR_GET_DUMPABLE: 0


SYSTEM_PYTHON = Path("/usr/bin/python3.11")
needs_root = pytest.mark.skipif(
    os.geteuid() != 0 or not SYSTEM_PYTHON.exists(), reason="needs root and /usr/bin/python3.11"
)


@pytest.fixture
def open_root() -> Iterator[Path]:
    """A directory every uid may search: pytest's own tree is 0700, out of plugins' reach."""
    root = Path(tempfile.mkdtemp(prefix="isolation-", dir="/tmp"))
    root.chmod(0o755)
    yield root
    subprocess.run(["rm", "-rf", str(root)], check=False)


@needs_root
def test_as_root_a_plugin_runs_under_its_own_uid_by_default_and_reaches_no_secret(
    start: Callable[..., Daemon], open_root: Path
) -> None:
    plugins = probe_plugins(open_root)
    # Parts of the plugin only root can read: the daemon gives them to the plugin's group.
    (plugins / "probe").chmod(0o700)
    (plugins / "probe" / "main.py").chmod(0o600)
    state = open_root / "state"
    daemon = start(plugins, python_interpreter_path=str(SYSTEM_PYTHON), STATE_DIR=str(state))
    report = run_probe(daemon, plugins, state)
    isolation = daemon.plugins()[PROBE]["isolation"]
    assert isolation["mode"] == "uid" and isolation["reason"] is None
    assert report["uid"] == isolation["uid"] >= 200_000
    assert report["environ"] == "PermissionError"
    assert report["key_file"] == "PermissionError"
    assert report["storage"] in ("PermissionError", "FileNotFoundError")
    assert report["metrics"] == "http 401"
    assert state.stat().st_mode & 0o777 == 0o700
    assert "not under its own uid" not in daemon.log()


def private_interpreter(root: Path) -> Path:
    """A copy of the system Python in a directory only root may search."""
    private = root / "private"
    (private / "bin").mkdir(parents=True)
    private.chmod(0o700)
    python = private / "bin" / SYSTEM_PYTHON.name
    shutil.copy2(SYSTEM_PYTHON, python)
    (private / "lib").symlink_to("/usr/lib")  # its standard library, found beside it
    return python


@needs_root
def test_a_plugin_its_uid_cannot_run_falls_back_with_a_warning_or_fails_when_uid_is_required(
    start: Callable[..., Daemon], open_root: Path
) -> None:
    plugins = open_root / "plugins"
    plugins.mkdir()
    copy_plugin("fastproto", plugins)
    python = private_interpreter(open_root)
    daemon = start(plugins, python_interpreter_path=str(python), STATE_DIR=str(open_root / "state0"))
    daemon.wait_ready(FASTPROTO)
    isolation = daemon.plugins()[FASTPROTO]["isolation"]
    assert isolation["mode"] == "none"
    assert f"{python.parent.parent} is not searchable" in isolation["reason"]
    (pid,) = daemon.instance_pids(FASTPROTO)
    assert psutil.Process(pid).uids().real == 0
    warnings = [line for line in daemon.log().splitlines() if "not under its own uid" in line]
    assert len(warnings) == 1 and "WARNING" in warnings[0] and str(python) in warnings[0]
    assert daemon.invoke(FASTPROTO, "emit", {"count": 1})[-1].ok

    strict = start(
        plugins,
        plugin_isolation="uid",
        python_interpreter_path=str(python),
        STATE_DIR=str(open_root / "state1"),
    )
    for _ in range(600):
        described = strict.plugins()[FASTPROTO]
        if described["status"] == "failed":
            break
        time.sleep(0.1)
    assert described["status"] == "failed", described
    assert "cannot run under its own uid" in described["error"]
    assert f"{python.parent.parent} is not searchable" in described["error"]
    assert described["instances"] == []


def test_local_means_the_same_for_uvicorn_and_the_access_check(
    start: Callable[..., Daemon], fastproto: Callable[..., Path]
) -> None:
    """A proxy on 127.0.0.2 (not a trusted one) forwarding a remote client does not make it local."""
    daemon = start(fastproto())

    def metrics(source: str, headers: dict[str, str]) -> int:
        transport = httpx.HTTPTransport(local_address=source)
        with httpx.Client(transport=transport, timeout=30) as client:
            return client.get(f"{daemon.url}/metrics", headers=headers).status_code

    remote = {"X-Forwarded-For": "203.0.113.9"}
    assert metrics("127.0.0.2", remote) == 401  # untrusted proxy speaking for a remote client
    assert metrics("127.0.0.1", remote) == 401  # trusted proxy: uvicorn resolves the remote client
    assert metrics("127.0.0.2", {"Forwarded": "for=203.0.113.9"}) == 401
    assert metrics("127.0.0.2", {}) == 200  # a local client, directly
    assert metrics("127.0.0.1", {"X-Forwarded-For": "127.0.0.1"}) == 200  # trusted proxy, local client
    assert metrics("127.0.0.2", {**remote, "X-Api-Key": daemon.key}) == 200
