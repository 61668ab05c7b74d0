"""The built-in trace page, loaded in a real headless Chromium."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

import httpx

from daemon.testing import REPO, Daemon
from tests.test_runtime import FP

ARTIFACTS = REPO / "test-artifacts"
TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--hide-scrollbars",
    "--window-size=1400,1000",
]


def chromium(tmp_path: Path, *args: str) -> str:
    binary = shutil.which("chromium") or shutil.which("chromium-browser")
    assert binary, "Chromium is missing: scripts/system-deps.sh installs Debian's chromium"
    out = subprocess.run(
        [binary, *CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'chromium-profile'}", *args],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    return out.stdout


def test_the_trace_page_shows_a_real_invocation_in_chromium(
    start: Callable[..., Daemon], fastproto: Callable[..., Path], tmp_path: Path
) -> None:
    daemon = start(fastproto())
    daemon.wait_ready(FP)
    request = daemon.invocation(FP, "emit", {"count": 3, "variables": 3, "storage_key": "k"})
    request["headers"]["traceparent"] = f"00-{TRACE_ID}-00f067aa0ba902b7-01"
    assert httpx.post(daemon.invoke_url(), **request, timeout=60).status_code == 200
    assert not daemon.invoke(FP, "emit", {"violate": True})[-1].ok  # an error to show

    index = chromium(tmp_path, "--dump-dom", f"{daemon.url}/debug/traces")
    for name in (
        "POST /plugin/{tenant_id}/dispatch/tool/invoke",
        "plugin.session",
        "output.validate",
        "plugin.backwards",
        "plugin.spawn",
    ):
        assert f"<td>{name}</td>" in index, name
    assert '<span class="err">1</span>' in index  # the failed validation is counted as an error
    assert f"trace={TRACE_ID}" in index

    url = f"{daemon.url}/debug/traces?trace={TRACE_ID}"
    waterfall = chromium(tmp_path, "--dump-dom", url)
    assert f"Trace {TRACE_ID}" in waterfall
    assert waterfall.count('class="bar"') == 1 + 1 + 1 + 2  # http, session, validate, set + get
    assert "plugin.messages_out=" in waterfall

    ARTIFACTS.mkdir(exist_ok=True)
    for page, target in (
        ("debug-traces-index.png", f"{daemon.url}/debug/traces"),
        ("debug-traces-trace.png", url),
    ):
        shot = ARTIFACTS / page
        shot.unlink(missing_ok=True)
        chromium(tmp_path, f"--screenshot={shot}", target)
        assert shot.stat().st_size > 10_000  # a rendered page, not an empty canvas
