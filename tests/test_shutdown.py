"""SIGTERM drill: stop accepting, let sessions drain, end the rest by name, cut no body."""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from daemon.testing import Daemon, Event, SSEReader
from tests.test_runtime import FP


@dataclass
class Stream:
    """One invocation read as it arrives, on its own thread."""

    events: list[Event] = field(default_factory=list)
    started: threading.Event = field(default_factory=threading.Event)
    pending: bytes = b""
    failure: BaseException | None = None


def read_stream(daemon: Daemon, params: dict[str, object]) -> tuple[Stream, threading.Thread]:
    result = Stream()

    def run() -> None:
        reader = SSEReader()
        try:
            with httpx.stream(
                "POST", daemon.invoke_url(), **daemon.invocation(FP, "emit", params), timeout=120
            ) as response:
                assert response.status_code == 200, response.read()
                for chunk in response.iter_raw():
                    result.events += reader.feed(chunk)
                    if result.events:
                        result.started.set()
        except BaseException as exc:  # reported by the test
            result.failure = exc
        finally:
            result.pending = reader.pending
            result.started.set()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return result, thread


def test_sigterm_drains_then_ends_every_stream_with_a_named_error(
    start: Callable[..., Daemon], fastproto: Callable[..., Path]
) -> None:
    daemon = start(fastproto(), server_shutdown_drain_timeout=3)
    daemon.wait_ready(FP)
    # Short streams finish inside the drain period; the others outlive it (and uvicorn's 5 s).
    short = [read_stream(daemon, {"count": 6, "delay_ms": 200}) for _ in range(4)]
    long = [read_stream(daemon, {"count": 1, "hang": True}) for _ in range(6)]
    long += [read_stream(daemon, {"count": 400, "delay_ms": 50}) for _ in range(4)]
    for stream, _ in short + long:
        assert stream.started.wait(60)
    daemon.proc.send_signal(signal.SIGTERM)

    # New connections are refused at once, while the sessions drain.
    deadline = time.monotonic() + 30
    while True:
        try:
            httpx.get(f"{daemon.url}/health/check", timeout=2)
        except httpx.ConnectError:
            break
        assert time.monotonic() < deadline, "the daemon kept accepting connections after SIGTERM"
        time.sleep(0.05)

    for stream, thread in short + long:
        thread.join(90)
        assert not thread.is_alive(), "a stream never ended"
        assert stream.failure is None, repr(stream.failure)  # the body ended cleanly
        assert stream.pending == b""
    for stream, _ in short:
        assert all(e.ok for e in stream.events)
        assert sum(e.message["type"] == "text" for e in stream.events) == 6
    for stream, _ in long:
        assert all(e.ok for e in stream.events[:-1])
        last = stream.events[-1]
        assert not last.ok
        assert "DaemonShuttingDownError" in last.raw["message"]
    # uvicorn re-raises the signal once it is done, so the exit reads as SIGTERM, as it should.
    assert daemon.proc.wait(60) in (0, -signal.SIGTERM)
    log = daemon.log()
    assert "Traceback" not in log and "Exception in ASGI application" not in log, log


def test_a_second_ctrl_c_ends_the_drain_at_once_with_the_named_error(
    start: Callable[..., Daemon], fastproto: Callable[..., Path]
) -> None:
    daemon = start(fastproto(), server_shutdown_drain_timeout=3600)
    daemon.wait_ready(FP)
    streams = [read_stream(daemon, {"count": 1, "hang": True}) for _ in range(3)]
    for stream, _ in streams:
        assert stream.started.wait(60)
    daemon.proc.send_signal(signal.SIGINT)
    time.sleep(0.5)  # the first one starts the drain, the second cuts it
    daemon.proc.send_signal(signal.SIGINT)
    for stream, thread in streams:
        thread.join(120)  # far less than the drain period: the drain did not run out
        assert not thread.is_alive()
        assert stream.failure is None and stream.pending == b""
        assert "DaemonShuttingDownError" in stream.events[-1].raw["message"]
    daemon.proc.wait(60)


def test_a_fatal_signal_leaves_every_thread_s_stack_in_the_log_and_no_plugin_behind(
    start: Callable[..., Daemon], fastproto: Callable[..., Path]
) -> None:
    """A crash below Python (an extension's abort) ends the daemon; its log must say where each
    thread was, and its plugins must not outlive it."""
    daemon = start(fastproto())
    daemon.wait_ready(FP)
    daemon.record_children()
    daemon.proc.send_signal(signal.SIGABRT)
    assert daemon.proc.wait(timeout=30) == -signal.SIGABRT
    log = daemon.log()
    assert "Fatal Python error: Aborted" in log
    assert "(most recent call first)" in log and "Thread 0x" in log, log[-2000:]
    daemon.stop()  # checks that no plugin process is left
