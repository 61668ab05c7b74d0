"""The load test's own checks: a run that hides a failure would be worse than no run."""

from __future__ import annotations

import os
import signal
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from daemon import wire
from daemon.testing import Daemon, Event, parse_sse
from loadtest.expect import BrokenStream, Expect, WrongVerdict, fastproto_emit
from loadtest.harness import Load, Monitor, make_plugins, run_design, survival_problems
from loadtest.report import failure_counts, judge
from tests.test_runtime import FP, wait_for

CODEC = wire.get_codec("orjson")


def stream(messages: list[Any], error: tuple[str, str] | None = None) -> list[Event]:
    """Events exactly as the daemon frames them."""
    body = b"".join(wire.sse_success(CODEC, m) for m in messages)
    if error is not None:
        body += wire.sse_error(CODEC, *error)
    return parse_sse(body)


VALID_PARAMS, VALID = fastproto_emit(count=2, variables=2, stream_chunks=2)
MESSAGES = list(VALID.messages or ())
INVALID = fastproto_emit(count=2, variables=2, stream_chunks=2, violate=True)[1]
VALIDATION = "ToolOutputValidationError"
RIGHT_VERDICT = "output variable 'done' failed 'type': 'not-a-bool' is not of type 'boolean'"


def test_the_expected_stream_passes(start: Callable[..., Daemon], fastproto: Callable[..., Path]) -> None:
    """The model of fastproto's output matches what the real plugin sends through the daemon."""
    daemon = start(fastproto())
    daemon.wait_ready(FP)
    VALID.check(daemon.invoke(FP, "emit", VALID_PARAMS))
    params, expect = fastproto_emit(count=3, variables=2, error_at=4)
    expect.check(daemon.invoke(FP, "emit", params))


@pytest.mark.parametrize(
    ("expect", "events", "failure", "says"),
    [
        (VALID, stream(MESSAGES[:-1]), BrokenStream, "differ"),
        (VALID, stream([*MESSAGES, MESSAGES[0]]), BrokenStream, "differ"),
        (
            VALID,
            stream(MESSAGES, (VALIDATION, "output variable 'done' failed 'required'")),
            WrongVerdict,
            "invalid",
        ),
        (
            VALID,
            stream(MESSAGES, ("ToolOutputValidationCrash", "dict changed size")),
            WrongVerdict,
            "invalid",
        ),
        (VALID, stream(MESSAGES, ("PluginInstanceDiedError", "exited")), BrokenStream, "unexpected"),
        (INVALID, stream(INVALID.messages or []), WrongVerdict, "passed validation"),
        (INVALID, stream(INVALID.messages or [], (VALIDATION, "other rule")), WrongVerdict, "wrong verdict"),
        (INVALID, stream(INVALID.messages or [], ("RuntimeError", "x")), BrokenStream, "unexpected"),
        (Expect(count=1), [], BrokenStream, "no events"),
        (Expect(), stream([], ("RuntimeError", "x")), BrokenStream, "unexpected"),
    ],
)
def test_every_wrong_stream_is_a_failure_of_the_right_kind(
    expect: Expect, events: list[Event], failure: type[Exception], says: str
) -> None:
    with pytest.raises(failure, match=says):
        expect.check(events)


def test_a_right_verdict_passes() -> None:
    INVALID.check(stream(list(INVALID.messages or []), (VALIDATION, RIGHT_VERDICT)))


def test_an_error_event_in_the_middle_is_a_broken_stream() -> None:
    events = stream(MESSAGES[:1], ("RuntimeError", "x")) + stream(MESSAGES[1:])
    with pytest.raises(BrokenStream, match="before the last event"):
        VALID.check(events)


def test_survival_checks_see_a_restarted_plugin_and_a_dead_daemon(
    start: Callable[..., Daemon], fastproto: Callable[..., Path]
) -> None:
    daemon = start(fastproto())
    daemon.wait_ready(FP)
    port = int(daemon.url.rsplit(":", 1)[1])
    monitor = Monitor(daemon)
    monitor.sample()
    assert survival_problems(daemon, daemon.proc.pid, port, monitor) == []
    os.kill(daemon.instance_pids(FP)[0], signal.SIGKILL)
    wait_for(lambda: daemon.plugins()[FP]["restarts"] == 1)
    assert survival_problems(daemon, daemon.proc.pid, port, monitor) == [
        "demo/fastproto restarted 1 times; only demo/crashproto crashes"
    ]
    daemon.proc.kill()
    daemon.proc.wait()
    assert survival_problems(daemon, daemon.proc.pid, port, monitor) == ["the daemon exited with code -9"]


def test_a_load_run_against_a_daemon_that_fails_streams_is_judged_failed(
    sdk_plugins_installed: Path, tmp_path: Path
) -> None:
    """With a 1 KiB session buffer the slow readers' sessions overflow: the run must say so."""
    plugins = make_plugins(tmp_path / "work")
    out = tmp_path / "out"
    out.mkdir()
    run = run_design(
        "owner", Load(users=16, spawn_rate=16, run_time=5), plugins, out, env={"session_buffer_bytes": 1024}
    )
    judge(run)
    verdicts, other = failure_counts(run)
    assert verdicts == 0 and other > 0
    assert any("slow reader" in p and "SlowClientError" in p for p in run.problems), run.problems
