"""``GET /debug/profile``: an on-CPU flame graph of a real daemon under real load."""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx

from daemon.testing import Daemon
from tests.test_runtime import FP, wait_for
from tests.test_tracepage import ARTIFACTS, chromium


@contextmanager
def load(daemon: Daemon) -> Iterator[list[int]]:
    """Invocations back to back on a thread while the block runs; yields the count so far."""
    done = [0]
    stop = threading.Event()

    def run() -> None:
        while not stop.is_set():
            assert daemon.invoke(FP, "emit", {"count": 20, "variables": 2})[-1].ok
            done[0] += 1

    thread = threading.Thread(target=run)
    thread.start()
    try:
        wait_for(lambda: done[0] > 0)
        yield done
    finally:
        stop.set()
        thread.join(timeout=60)


def test_a_speedscope_profile_charges_cpu_to_the_daemon_s_own_code(
    start: Callable[..., Daemon], fastproto: Callable[..., Path]
) -> None:
    daemon = start(fastproto())
    daemon.wait_ready(FP)
    with load(daemon):
        params = {"seconds": 2, "format": "speedscope"}
        r = httpx.get(f"{daemon.url}/debug/profile", params=params, timeout=60)
    assert r.status_code == 200 and r.headers["content-type"] == "application/json"
    assert "attachment" in r.headers["content-disposition"]
    doc = r.json()
    assert doc["$schema"] == "https://www.speedscope.app/file-format-schema.json"
    frames = doc["shared"]["frames"]
    profiles = {p["name"]: p for p in doc["profiles"]}
    main = profiles["thread MainThread (on-CPU)"]
    assert main["unit"] == "microseconds" and len(main["samples"]) == len(main["weights"]) > 0
    assert main["endValue"] == sum(main["weights"]) > 0
    files = {frames[i]["file"] for stack in main["samples"] for i in stack}
    # The loop works on requests and relays, not only on waiting: the daemon's request code shows.
    assert files & {"daemon/app.py", "daemon/sse.py", "daemon/invocation.py", "daemon/runtime.py"}, files


def test_an_idle_daemon_s_waiting_threads_add_no_cpu(
    start: Callable[..., Daemon], fastproto: Callable[..., Path]
) -> None:
    """The plugin's reader thread sits in a blocking read the whole time: a sampler that counts
    what it sees would show it busy; the CPU clocks say it used nothing."""
    daemon = start(fastproto(), plugin_instances=2)
    daemon.wait_ready(FP, instances=2)
    r = httpx.get(f"{daemon.url}/debug/profile", params={"seconds": 1.5, "format": "speedscope"}, timeout=60)
    assert r.status_code == 200
    doc = r.json()
    readers = [p for p in doc["profiles"] if p["name"].startswith("thread reader")]
    assert sum(p["endValue"] for p in readers) < 20_000  # µs in 1.5 s: heartbeats only
    total = sum(p["endValue"] for p in doc["profiles"])
    assert total < 300_000  # an idle daemon: well under a fifth of a core


def test_one_profile_at_a_time_and_bounded_durations(
    start: Callable[..., Daemon], fastproto: Callable[..., Path]
) -> None:
    daemon = start(fastproto())
    daemon.wait_ready(FP)
    url = f"{daemon.url}/debug/profile"
    for params, expected in (
        ({"seconds": "61"}, "at most 60"),
        ({"seconds": "0"}, "more than 0"),
        ({"seconds": "ten"}, "must be a number"),
        ({"seconds": "1", "format": "pprof"}, "svg or speedscope"),
        ({"seconds": "1", "hz": "5000"}, "hz must be a whole number from 10 to 1000"),
    ):
        bad = httpx.get(url, params=params, timeout=30)
        assert bad.status_code == 400 and expected in bad.json()["message"], params

    first: list[httpx.Response] = []

    def long_profile() -> None:  # tried again if it arrived while a probe below was recording
        while not first or first[-1].status_code == 409:
            first.append(httpx.get(url, params={"seconds": 5}, timeout=60))

    thread = threading.Thread(target=long_profile)
    thread.start()
    try:

        def refused() -> bool:
            second = httpx.get(url, params={"seconds": 0.1}, timeout=30)
            if second.status_code == 200:
                return False
            assert second.status_code == 409
            assert second.json() == {
                "code": -409,
                "message": "a profile is already being recorded; try again when it ends",
                "data": None,
            }
            return True

        wait_for(refused)
    finally:
        thread.join(timeout=60)
    assert first[-1].status_code == 200 and first[-1].text.startswith("<svg")
    assert httpx.get(url, params={"seconds": 0.2}, timeout=30).status_code == 200  # free again


def test_the_profile_follows_the_debug_access_rule(
    start: Callable[..., Daemon], fastproto: Callable[..., Path]
) -> None:
    daemon = start(fastproto(), debug_access="key")
    url = f"{daemon.url}/debug/profile?seconds=0.2"
    assert httpx.get(url, timeout=30).status_code == 303  # to the sign-in form, as the trace page
    assert httpx.get(url, headers={"x-api-key": daemon.key}, timeout=30).status_code == 200
    off = start(fastproto(name="off"), debug_access="off")
    assert httpx.get(f"{off.url}/debug/profile?seconds=0.2", timeout=30).status_code == 404


def test_the_flame_graph_opens_in_chromium_from_the_trace_page(
    start: Callable[..., Daemon], fastproto: Callable[..., Path], tmp_path: Path
) -> None:
    daemon = start(fastproto())
    daemon.wait_ready(FP)
    index = chromium(tmp_path, "--dump-dom", f"{daemon.url}/debug/traces")
    assert 'href="/debug/profile?seconds=10"' in index
    assert 'href="/debug/profile?seconds=10&amp;format=speedscope"' in index

    url = f"{daemon.url}/debug/profile?seconds=2"
    with load(daemon):
        dom = chromium(tmp_path, "--dump-dom", url)
        assert "<parsererror" not in dom and "This page contains the following errors" not in dom
        assert dom.count('<g class="frame">') > 10
        assert "thread MainThread" in dom and "(daemon/" in dom
        ARTIFACTS.mkdir(exist_ok=True)
        shot = ARTIFACTS / "debug-profile.png"
        shot.unlink(missing_ok=True)
        chromium(tmp_path, f"--screenshot={shot}", url)
    assert shot.stat().st_size > 10_000  # a drawn flame graph, not an empty canvas


def _ignored_signals(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        return int(next(line for line in status if line.startswith("SigIgn:")).split()[1], 16)


def test_after_a_profile_sigprof_is_harmless_and_plugins_start_with_default_signals(
    start: Callable[..., Daemon], fastproto: Callable[..., Path]
) -> None:
    daemon = start(fastproto())
    daemon.wait_ready(FP)
    assert httpx.get(f"{daemon.url}/debug/profile", params={"seconds": 0.3}, timeout=30).status_code == 200
    os.kill(daemon.proc.pid, signal.SIGPROF)  # a late timer signal: the default action would end it
    assert daemon.invoke(FP, "emit")[-1].ok

    old = daemon.instance_pids(FP)[0]
    os.kill(old, signal.SIGKILL)  # the daemon starts a new plugin process after the profile
    new = wait_for(lambda: [p for p in daemon.instance_pids(FP) if p != old])[0]
    assert not _ignored_signals(new) & (1 << (signal.SIGPROF - 1))  # not inherited as ignored
    assert daemon.invoke(FP, "emit")[-1].ok
