"""The plugin process runtime, against real fastproto subprocesses behind a real daemon."""

from __future__ import annotations

import concurrent.futures
import contextlib
import os
import signal
import sqlite3
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import psutil

from daemon.testing import Daemon, parse_sse

FP = "demo/fastproto"


def wait_for(predicate: Callable[[], Any], limit: float = 60.0) -> Any:
    """Poll a condition the daemon will reach; the limit only keeps a broken build from hanging."""
    end = time.monotonic() + limit
    while True:
        value = predicate()
        if value:
            return value
        assert time.monotonic() < end, "condition not reached"
        time.sleep(0.05)


def last_error(events: list[Any]) -> dict[str, Any]:
    assert events and not events[-1].ok, events
    return events[-1].error


def test_crash_mid_stream_ends_the_session_and_the_instance_restarts(
    start: Callable[..., Daemon], fastproto: Callable[..., Path]
) -> None:
    daemon = start(fastproto())
    daemon.wait_ready(FP)
    (first_pid,) = daemon.instance_pids(FP)
    events = daemon.invoke(FP, "emit", {"count": 5, "crash_at": 2})
    assert [e.message["message"]["text"] for e in events[:-1]] == ["abcdefghijklmnop"] * 2
    error = last_error(events)
    assert error["error_type"] == "PluginInstanceDiedError"
    assert "exited (exit code 3)" in error["message"]
    daemon.wait_ready(FP)
    assert daemon.instance_pids(FP) != [first_pid]
    assert daemon.plugins()[FP]["restarts"] >= 1
    assert daemon.invoke(FP, "emit", {"count": 1})[-1].ok


def test_every_in_flight_session_ends_at_once_when_the_instance_dies(
    start: Callable[..., Daemon], fastproto: Callable[..., Path]
) -> None:
    daemon = start(fastproto())
    daemon.wait_ready(FP)
    with httpx.Client(timeout=60) as client:
        hanging = [
            client.stream(
                "POST",
                daemon.invoke_url(),
                **daemon.invocation(FP, "emit", {"count": 1, "hang": True}),
            )
            for _ in range(3)
        ]
        responses = [h.__enter__() for h in hanging]
        wait_for(lambda: daemon.plugins()[FP]["instances"][0]["sessions"] == 3)
        os.kill(daemon.instance_pids(FP)[0], signal.SIGKILL)
        for response, h in zip(responses, hanging, strict=True):
            events = parse_sse(response.read())
            assert events[0].ok
            assert last_error(events)["error_type"] == "PluginInstanceDiedError"
            h.__exit__(None, None, None)


def test_a_plugin_that_stops_talking_is_killed_at_the_liveness_limit(
    start: Callable[..., Daemon], fastproto: Callable[..., Path]
) -> None:
    daemon = start(fastproto({"heartbeat_interval_s": 0.2}), plugin_liveness_timeout=1)
    daemon.wait_ready(FP)
    events = daemon.invoke(FP, "emit", {"count": 1, "stop_heartbeat": True})
    error = last_error(events)
    assert error["error_type"] == "PluginInstanceDiedError"
    assert "produced no output for 1 s" in error["message"]
    daemon.wait_ready(FP)


def test_no_heartbeat_at_start_fails_the_start_and_invocations_get_503(
    start: Callable[..., Daemon], fastproto: Callable[..., Path]
) -> None:
    daemon = start(fastproto({"no_heartbeat": True}), plugin_ready_timeout=1)
    wait_for(lambda: (daemon.plugins()[FP]["error"] or "").endswith("(exit code -9)"))
    assert "sent no heartbeat within 1 s" in daemon.plugins()[FP]["error"]
    r = httpx.post(
        daemon.invoke_url(),
        **daemon.invocation(FP, "emit"),
        timeout=60,
    )
    assert r.status_code == 503
    assert "has no ready instance" in r.json()["message"]


def test_exit_during_start_is_retried_with_growing_backoff(
    start: Callable[..., Daemon], fastproto: Callable[..., Path]
) -> None:
    daemon = start(fastproto({"exit_during_start": 7}), plugin_max_start_failures=10)
    wait_for(lambda: daemon.plugins()[FP]["restarts"] >= 3)
    plugin = daemon.plugins()[FP]
    assert plugin["status"] == "starting"
    assert "failed to start: exited (exit code 7)" in plugin["error"]
    delays = [
        float(line.rsplit(" in ", 1)[1].split()[0])
        for line in daemon.log().splitlines()
        if "restarting slot 0 in" in line
    ]
    assert delays[:3] == sorted(delays[:3]) and delays[0] < delays[2]


def test_a_plugin_failing_every_start_is_failed_answers_at_once_and_recovers_when_repaired(
    start: Callable[..., Daemon], fastproto: Callable[..., Path]
) -> None:
    plugins = fastproto({"exit_during_start": 7})
    daemon = start(plugins, plugin_restart_backoff_max=1)  # the ready wait stays at 120 s
    plugin = wait_for(lambda: (p := daemon.plugins()[FP])["status"] == "failed" and p)
    assert "failed to start: exited (exit code 7)" in plugin["error"]
    assert "fastproto: exiting during start-up with code 7" in plugin["stderr"]
    assert len(plugin["stderr"]) <= 20
    # Answered without the 120 s ready wait: the client gives up (and the test fails) after 60 s.
    r = httpx.post(daemon.invoke_url(), **daemon.invocation(FP, "emit"), timeout=60)
    assert r.status_code == 503
    assert "exited (exit code 7)" in r.json()["message"]
    (plugins / "fastproto" / "fault.json").unlink()  # repaired on disk: the next retry starts it
    daemon.wait_ready(FP)
    plugin = daemon.plugins()[FP]
    assert plugin["status"] == "ready" and plugin["error"] is None and plugin["stderr"] == []
    assert daemon.invoke(FP, "emit", {"count": 1})[-1].ok


def test_a_stderr_line_without_end_is_read_in_bounded_memory(
    start: Callable[..., Daemon], fastproto: Callable[..., Path]
) -> None:
    flood = 300 * 1024 * 1024
    daemon = start(fastproto({"stderr_bytes": flood}))
    daemon.wait_ready(FP)  # the flood comes before the first heartbeat, so it has been read
    rss = psutil.Process(daemon.proc.pid).memory_info().rss
    assert rss < flood / 2, f"daemon RSS {rss >> 20} MiB after a {flood >> 20} MiB stderr line"
    assert daemon.invoke(FP, "emit", {"count": 1})[-1].ok


def test_a_stderr_flood_is_logged_at_a_bounded_rate(
    start: Callable[..., Daemon], fastproto: Callable[..., Path]
) -> None:
    flood = 50 * 1024 * 1024
    daemon = start(fastproto({"stderr_bytes": flood, "stderr_newlines": True}))
    daemon.wait_ready(FP)
    wait_for(lambda: "bytes/s of stderr; not logging" in daemon.log_path.read_text(errors="replace"))
    assert daemon.log_path.stat().st_size < flood / 10


def test_backwards_calls_are_bounded_per_session(
    start: Callable[..., Daemon], fastproto: Callable[..., Path]
) -> None:
    daemon = start(fastproto())
    daemon.wait_ready(FP)
    events = daemon.invoke(FP, "emit", {"count": 1, "backwards_flood": 100_000, "hang": True})
    error = last_error(events)
    assert error["error_type"] == "PluginBackwardsInvocationLimitError"
    assert "concurrent backwards calls" in error["message"]
    assert httpx.get(f"{daemon.url}/health/check", timeout=60).status_code == 200
    assert daemon.invoke(FP, "emit", {"count": 1, "storage_key": "k", "storage_value": "v"})[-1].ok
    assert daemon.plugins()[FP]["restarts"] == 0


def test_backwards_calls_still_running_are_cancelled_when_their_session_ends(
    start: Callable[..., Daemon], fastproto: Callable[..., Path], tmp_path: Path
) -> None:
    """Storage writes the daemon cannot finish (the database is locked) end with the client."""
    daemon = start(fastproto())
    daemon.wait_ready(FP)
    calls = 8
    locker = sqlite3.connect(tmp_path / "state0" / "state.sqlite3", isolation_level=None)

    def in_flight() -> int:
        return sum(i["backwards_calls"] for i in daemon.plugins()[FP]["instances"])

    def answered() -> int:  # a write that waited out SQLite's busy timeout is answered with an error
        return daemon.log_path.read_text(errors="replace").count("backwards invocation failed")

    try:
        locker.execute("BEGIN IMMEDIATE")  # every write waits for this lock, then fails
        params = {"count": 1, "backwards_flood": calls, "flood_writes": True, "hang": True}
        request = daemon.invocation(FP, "emit", params)
        with httpx.Client(timeout=60) as client, client.stream("POST", daemon.invoke_url(), **request) as r:
            chunks = r.iter_raw()
            next(chunks)
            wait_for(in_flight)
        wait_for(lambda: in_flight() == 0)  # the client left: the session ended, its calls with it
        # Not answered one by one: while the lock is held each write takes SQLite's busy timeout.
        assert answered() < calls
    finally:
        locker.close()
    assert daemon.plugins()[FP]["restarts"] == 0
    assert daemon.invoke(FP, "emit", {"count": 1, "storage_key": "k", "storage_value": "v"})[-1].ok


def test_a_slow_start_is_waited_for(start: Callable[..., Daemon], fastproto: Callable[..., Path]) -> None:
    daemon = start(fastproto({"start_delay_s": 1.5}))
    # No wait_ready: the invocation arrives while the plugin is still starting.
    assert daemon.invoke(FP, "emit", {"count": 1})[-1].ok


def test_garbage_lines_are_logged_and_skipped(
    start: Callable[..., Daemon], fastproto: Callable[..., Path]
) -> None:
    daemon = start(fastproto())
    daemon.wait_ready(FP)
    events = daemon.invoke(FP, "emit", {"count": 2, "garbage": 3})
    assert [e.ok for e in events] == [True, True, True]  # two texts and `done`
    assert "printed non-protocol output" in daemon.log()
    assert daemon.plugins()[FP]["restarts"] == 0


def test_stray_stdout_lines_are_logged_at_a_bounded_rate(
    start: Callable[..., Daemon], fastproto: Callable[..., Path]
) -> None:
    # A plugin printing in a loop: ~5 MB of stray lines in a burst, which unbounded would be
    # ~15 MB of warnings in the daemon's log.
    lines = 100_000
    daemon = start(fastproto())
    daemon.wait_ready(FP)
    events = daemon.invoke(FP, "emit", {"count": 1, "garbage": lines})
    assert [e.ok for e in events] == [True, True]
    text = daemon.log_path.read_text(errors="replace")
    assert "bytes/s of stdout logging; not logging the rest of this second" in text
    assert text.count("printed non-protocol output") < lines / 10
    assert daemon.plugins()[FP]["restarts"] == 0


def test_an_oversized_line_fails_the_instance_with_a_clear_error(
    start: Callable[..., Daemon], fastproto: Callable[..., Path]
) -> None:
    daemon = start(fastproto(), plugin_max_line_bytes=65536)
    daemon.wait_ready(FP)
    events = daemon.invoke(FP, "emit", {"count": 1, "oversized": 200_000})
    error = last_error(events)
    assert "longer than the 65536 byte limit" in error["message"]
    daemon.wait_ready(FP)
    assert daemon.invoke(FP, "emit", {"count": 1})[-1].ok


def test_a_plugin_that_closes_stdout_is_failed_and_restarted(
    start: Callable[..., Daemon], fastproto: Callable[..., Path]
) -> None:
    daemon = start(fastproto({"close_stdout_after_s": 0.5}))
    wait_for(lambda: "closed its stdout" in daemon.log())
    wait_for(lambda: daemon.plugins()[FP]["restarts"] >= 1)


def test_requests_go_to_the_least_busy_ready_instance(
    start: Callable[..., Daemon], fastproto: Callable[..., Path]
) -> None:
    daemon = start(fastproto(), plugin_instances=2)
    daemon.wait_ready(FP, instances=2)
    request = daemon.invocation(FP, "emit", {"count": 1, "hang": True})
    with httpx.Client(timeout=60) as client:
        url = daemon.invoke_url()
        with client.stream("POST", url, **request) as first:
            first_chunks = first.iter_raw()  # keep a reference: a dropped iterator closes the response
            next(first_chunks)
            with client.stream("POST", url, **request) as second:
                second_chunks = second.iter_raw()
                next(second_chunks)
                counts = [i["sessions"] for i in daemon.plugins()[FP]["instances"]]
                assert counts == [1, 1]
    wait_for(lambda: [i["sessions"] for i in daemon.plugins()[FP]["instances"]] == [0, 0])


def test_requests_arriving_together_are_spread_over_the_instances(
    start: Callable[..., Daemon], fastproto: Callable[..., Path]
) -> None:
    daemon = start(fastproto(), plugin_instances=2)
    daemon.wait_ready(FP, instances=2)
    request = daemon.invocation(FP, "emit", {"count": 1, "hang": True})
    with contextlib.ExitStack() as stack, concurrent.futures.ThreadPoolExecutor(16) as pool:
        client = stack.enter_context(httpx.Client(timeout=60))

        def open_one() -> None:
            response = stack.enter_context(client.stream("POST", daemon.invoke_url(), **request))
            chunks = response.iter_raw()
            next(chunks)
            opened.append(chunks)  # keep a reference: a dropped iterator closes the response

        opened: list[Any] = []
        list(pool.map(lambda _: open_one(), range(16)))
        assert sorted(i["sessions"] for i in daemon.plugins()[FP]["instances"]) == [8, 8]


def test_plugins_get_a_minimal_environment_without_the_server_key(
    start: Callable[..., Daemon], fastproto: Callable[..., Path]
) -> None:
    daemon = start(fastproto())
    daemon.wait_ready(FP)
    (pid,) = daemon.instance_pids(FP)
    environ = psutil.Process(pid).environ()
    assert environ["INSTALL_METHOD"] == "local"
    assert daemon.key not in "".join(f"{k}={v}" for k, v in environ.items())
    assert not any(name.startswith(("SERVER_", "PLUGIN")) for name in environ)


def test_plugins_die_with_the_daemon_even_on_sigkill(
    start: Callable[..., Daemon], fastproto: Callable[..., Path]
) -> None:
    daemon = start(fastproto(), plugin_instances=2)
    daemon.wait_ready(FP, instances=2)
    pids = daemon.instance_pids(FP)
    daemon.proc.kill()
    daemon.proc.wait()
    wait_for(lambda: not any(psutil.pid_exists(p) and psutil.Process(p).status() != "zombie" for p in pids))


def test_a_plugin_that_dies_while_a_detached_child_holds_its_pipes_is_failed_and_restarted(
    start: Callable[..., Daemon], fastproto: Callable[..., Path], tmp_path: Path
) -> None:
    # The child (fastproto's orphan_pipes) leaves the plugin's process group, so killing the
    # group does not close the pipes: the daemon must notice the plugin's own exit, not wait
    # for stdout's end (the liveness limit, an hour here, would be the only way out).
    daemon = start(fastproto(), plugin_liveness_timeout=3600)
    daemon.wait_ready(FP)
    (first_pid,) = daemon.instance_pids(FP)
    try:
        events = daemon.invoke(FP, "emit", {"count": 3, "crash_at": 1, "orphan_pipes": True}, timeout=60)
        error = last_error(events)
        assert error["error_type"] == "PluginInstanceDiedError"
        assert "exited (exit code 3)" in error["message"]
        daemon.wait_ready(FP, limit=60)
        assert daemon.instance_pids(FP) != [first_pid]
        assert daemon.invoke(FP, "emit", {"count": 1}, timeout=60)[-1].ok
    finally:
        for proc in psutil.process_iter(["cmdline"]):
            cmdline = " ".join(proc.info["cmdline"] or [])
            if str(tmp_path) in cmdline and "time.sleep(3600)" in cmdline:  # the orphan, if still alive
                with contextlib.suppress(psutil.Error):
                    proc.kill()
