"""The built-in trace page, loaded in a real headless Chromium."""

from __future__ import annotations

import re
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

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


FAILED_ID = "0af7651916cd43dd8448eb211c80319c"
PLAIN_ID = "5e1a2f3b4c5d6e7f8091a2b3c4d5e6f7"
WHEN = re.compile(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{3} [A-Z+\-0-9]+")


def invoke_traced(daemon: Daemon, trace_id: str, tool: str, params: dict[str, Any], tenant: str) -> str:
    request = daemon.invocation(FP, tool, params)
    request["headers"]["traceparent"] = f"00-{trace_id}-00f067aa0ba902b7-01"
    response = httpx.post(daemon.invoke_url(tenant), **request, timeout=60)
    assert response.status_code == 200
    return response.text


def section(page: str, heading: str) -> str:
    """The part of the page under an <h2>, up to the next one."""
    return page.split(f"<h2>{heading}</h2>", 1)[1].split("<h2>", 1)[0]


def test_the_trace_page_shows_a_real_invocation_in_chromium(
    start: Callable[..., Daemon], fastproto: Callable[..., Path], tmp_path: Path
) -> None:
    daemon = start(fastproto())
    daemon.wait_ready(FP)  # polls GET /plugins: none of that may reach the ring
    for _ in range(5):
        assert httpx.get(f"{daemon.url}/health/check").status_code == 200
        assert httpx.get(f"{daemon.url}/metrics").status_code == 200
    invoke_traced(daemon, TRACE_ID, "emit", {"count": 3, "variables": 3, "storage_key": "k"}, "tenant-a")
    failed = invoke_traced(daemon, FAILED_ID, "emit", {"count": 2, "error_at": 1}, "tenant-b")
    assert "fastproto error at message 1" in failed  # the caller saw an error event on a 200 stream
    invoke_traced(daemon, PLAIN_ID, "plain", {"count": 1}, "tenant-a")
    assert not daemon.invoke(FP, "emit", {"violate": True}, tenant="tenant-c")[-1].ok

    index = chromium(tmp_path, "--dump-dom", f"{daemon.url}/debug/traces")
    http = "POST /plugin/{tenant_id}/dispatch/tool/invoke"
    for name in (http, "plugin.session", "output.validate", "plugin.backwards", "plugin.spawn"):
        assert f"<td>{name}</td>" in index, name
    for polled in ("/plugins", "/health/check", "/metrics", "/favicon.ico"):
        assert f"<td>GET {polled}</td>" not in index, polled
    # Both failed streams answered 200: the HTTP spans count them as errors, as the callers saw them.
    http_row = index.split(f"<td>{http}</td>", 1)[1].split("</tr>", 1)[0]
    assert '<span class="err">2</span>' in http_row
    assert f"trace={TRACE_ID}" in index
    assert WHEN.search(index), "times carry a date and a time zone"
    errors = section(index, "Recent errors")
    assert "tenant-b" in errors and "demo/fastproto · emit" in errors
    assert "RuntimeError: fastproto error at message 1" in errors
    assert "ToolOutputValidationError: output variable" in errors
    assert TRACE_ID not in errors and PLAIN_ID not in errors

    # Filters narrow every table to the traces that match; the form keeps the choice.
    filtered_url = f"{daemon.url}/debug/traces?tenant=tenant-a&tool=emit&outcome=ok"
    filtered = chromium(tmp_path, "--dump-dom", filtered_url)
    recent = section(filtered, "Recent traces")
    assert TRACE_ID in recent and FAILED_ID not in recent and PLAIN_ID not in recent
    assert "filtered: tenant tenant-a, tool emit, outcome ok" in filtered
    assert '<option value="tenant-a" selected="">' in filtered
    only_errors = chromium(tmp_path, "--dump-dom", f"{daemon.url}/debug/traces?outcome=error")
    recent = section(only_errors, "Recent traces")
    assert FAILED_ID in recent and TRACE_ID not in recent
    by_name = chromium(tmp_path, "--dump-dom", f"{daemon.url}/debug/traces?name=plugin.session&tool=plain")
    assert "<td>plugin.session</td>" in by_name and f"<td>{http}</td>" not in by_name
    assert PLAIN_ID in section(by_name, "Recent traces")

    url = f"{daemon.url}/debug/traces?trace={TRACE_ID}"
    waterfall = chromium(tmp_path, "--dump-dom", url)
    assert f"Trace {TRACE_ID}" in waterfall
    assert waterfall.count('class="bar"') == 1 + 1 + 1 + 2  # http, session, validate, set + get
    # Attributes one per line, with units.
    assert '<div><span class="k">plugin.messages_out</span> 8</div>' in waterfall
    assert re.search(r'<span class="k">plugin.decode_seconds</span> [0-9.]+ (µs|ms)</div>', waterfall)
    assert re.search(r'<span class="k">plugin.bytes_in</span> [0-9.]+ (bytes|KiB)</div>', waterfall)
    assert "0.000" not in waterfall.split("<table>", 1)[1]  # no raw float seconds left
    assert WHEN.search(waterfall)

    # A trace is found by the start of its id, as the lists show it.
    failed_url = f"{daemon.url}/debug/traces?trace={FAILED_ID[:16]}"
    failed_page = chromium(tmp_path, "--dump-dom", failed_url)
    assert f"Trace {FAILED_ID}" in failed_page
    assert "<b>failed:</b> RuntimeError: fastproto error at message 1" in failed_page
    session_row = failed_page.split("<td style", 3)[2]  # the http span's row, then the session's
    assert "error: RuntimeError: fastproto error at message 1" in session_row
    assert failed_page.count('class="bar error"') == 2  # the session and the HTTP span that carried it
    assert '<span class="k">error.type</span> RuntimeError' in failed_page

    plain = chromium(tmp_path, "--dump-dom", f"{daemon.url}/debug/traces?trace={PLAIN_ID}")
    assert '<span class="k">validation.design</span> no schema' in plain

    ARTIFACTS.mkdir(exist_ok=True)
    for page, target in (
        ("debug-traces-index.png", f"{daemon.url}/debug/traces"),
        ("debug-traces-filtered.png", filtered_url),
        ("debug-traces-trace.png", url),
        ("debug-traces-failed.png", failed_url),
    ):
        shot = ARTIFACTS / page
        shot.unlink(missing_ok=True)
        chromium(tmp_path, f"--screenshot={shot}", target)
        assert shot.stat().st_size > 10_000  # a rendered page, not an empty canvas


def test_polling_routes_are_traced_when_the_operator_asks(
    start: Callable[..., Daemon], fastproto: Callable[..., Path]
) -> None:
    daemon = start(fastproto(), TRACE_UNTRACED_PATHS="/metrics")
    daemon.wait_ready(FP)
    assert httpx.get(f"{daemon.url}/health/check").status_code == 200
    assert httpx.get(f"{daemon.url}/metrics").status_code == 200
    page = httpx.get(f"{daemon.url}/debug/traces").text
    assert "<td>GET /plugins</td>" in page and "<td>GET /health/check</td>" in page
    assert "<td>GET /metrics</td>" not in page
