"""Drills: no output, however hostile, holds the event loop (real daemon, real plugin, HTTP).

A plugin declares an ``output_schema`` whose pattern backtracks exponentially on its own
output, or streams a variable in hundreds of thousands of chunks; meanwhile the daemon must
keep answering, and the session must end with the right verdict. The time bounds here only
say "did not hang": the old code took minutes where the new one takes milliseconds.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from daemon import validation
from daemon.errors import VALIDATION_TIMEOUT
from daemon.testing import Daemon, copy_plugin
from tests.test_runtime import FP, last_error
from tests.test_validation import SCHEMA, consume, new_session, plugin_output

# Each "c<i>;" chunk doubles the ways ``(.|c)*`` can split the string before ``Z`` fails:
# with 40 chunks Python's ``re`` backtracks for days, holding the GIL.
CATASTROPHIC = "^(.|c)*Z$"


def catastrophic_plugin(root: Path) -> Path:
    plugins = root / "plugins"
    plugins.mkdir()
    tool = copy_plugin("fastproto", plugins) / "tools" / "emit.yaml"
    text = tool.read_text()
    declared = "    streamed:\n      type: string\n"
    assert declared in text
    tool.write_text(text.replace(declared, declared + f'      pattern: "{CATASTROPHIC}"\n'))
    return plugins


@pytest.mark.parametrize("backend", [None, "jsonschema"], ids=["default", "python"])
def test_a_backtracking_pattern_does_not_stall_the_daemon(
    start: Callable[..., Daemon], tmp_path: Path, backend: str | None
) -> None:
    options = {"validator_backend": backend} if backend else {}
    daemon = start(catastrophic_plugin(tmp_path), **options)
    daemon.wait_ready(FP)
    result: list[object] = []
    invocation = threading.Thread(
        target=lambda: result.append(daemon.invoke(FP, "emit", {"count": 0, "stream_chunks": 40}, timeout=60))
    )
    invocation.start()
    for _ in range(5):  # the daemon keeps answering while (and after) that output is checked
        assert httpx.get(f"{daemon.url}/health/check", timeout=30).status_code == 200
    invocation.join(90)
    assert result, "the invocation did not end"
    error = last_error(result[0])  # type: ignore[arg-type]
    assert error["error_type"] == "ToolOutputValidationError"
    assert error["message"].startswith("output variable 'streamed' failed 'pattern': ")


def test_a_variable_streamed_in_200000_chunks_is_joined_once(
    start: Callable[..., Daemon], fastproto: Callable[..., Path]
) -> None:
    """Joining per chunk copied the whole string each time: minutes of loop time, now linear."""
    daemon = start(fastproto())
    daemon.wait_ready(FP)
    chunks = 200_000
    events = daemon.invoke(FP, "emit", {"count": 0, "stream_chunks": chunks}, timeout=90)
    assert all(e.ok for e in events), events[-1].raw
    streamed = [e.message["message"] for e in events if e.message["type"] == "variable"]
    assert sum(m["variable_name"] == "streamed" for m in streamed) == chunks
    assert httpx.get(f"{daemon.url}/health/check", timeout=30).status_code == 200


def test_a_check_past_its_deadline_fails_the_session_by_name(monkeypatch: pytest.MonkeyPatch) -> None:
    """Whatever else is slow in the Python backend stops at the deadline, with a named error."""
    monkeypatch.setattr(validation, "CHECK_DEADLINE", -1.0)  # every check is already late

    async def main() -> object:
        session = new_session(validation.ValidatorDesign.OWNER, SCHEMA)
        session.deliver(plugin_output(2), 100)
        session.finish()
        return await consume(session)

    count, error = asyncio.run(main())  # type: ignore[misc]
    assert count == 5
    assert error is not None and error.error_type == VALIDATION_TIMEOUT
    assert "did not finish within" in error.message


def test_the_race_between_closer_and_consumer_still_shows_end_to_end(tmp_path: Path) -> None:
    """Real daemon, real plugin: the plugin's stdout is read on the event loop, and the
    reader still closes a session before its consumer has applied the queued variables, so
    ``lock`` still validates too early where ``owner`` is right every time. If both were
    right, the design comparison (bench/race.py, bench/REPORT.md) would measure nothing."""
    from bench.race import run_design

    def run(design: str) -> dict[str, object]:
        return asyncio.run(run_design(design, "fastproto", 24, 8, 5, tmp_path))

    owner, lock = run("owner"), run("lock")
    assert owner["violations"] == 0, owner["outcomes"]
    assert lock["violations"] > 0, lock["outcomes"]
    assert set(lock["outcomes"]) <= {"correct", "valid output failed", "wrong rule reported"}
