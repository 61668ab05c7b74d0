"""Failure drills: each plugin fault, with a second plugin and other sessions in flight around it.

One daemon serves ``demo/victim`` (a copy of fastproto that gets the fault) and
``demo/fastproto`` (a bystander), two instances each. Before the fault, a long
session that streams numbered events is opened on the bystander and, for faults
injected at run time, one on the victim's other instance. The drill checks that the
affected invocation ends with a named error, that the victim restarts with a growing
backoff, and that the other sessions stream on without losing an event while the
bystander is never restarted.
"""

from __future__ import annotations

import contextlib
import re
from collections import defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from daemon.testing import Daemon, Event, SSEReader, copy_plugin
from tests.test_runtime import FP, last_error, wait_for

VICTIM = "demo/victim"
BEAT = {"heartbeat_interval_s": 0.2}  # so a low liveness limit never kills a healthy instance


class LongStream:
    """A session that streams numbered json events for minutes; read on demand."""

    def __init__(self, stack: contextlib.ExitStack, client: httpx.Client, daemon: Daemon, plugin: str):
        params = {"count": 100000, "kind": "json", "size": 8, "delay_ms": 2}
        request = daemon.invocation(plugin, "emit", params, provider="fastproto")
        self.response = stack.enter_context(client.stream("POST", daemon.invoke_url(), **request))
        assert self.response.status_code == 200
        self._chunks = self.response.iter_raw()
        self._reader = SSEReader()
        self.events: list[Event] = []
        self.read_at_least(1)

    def read_at_least(self, n: int) -> None:
        while len(self.events) < n:
            self.events += self._reader.feed(next(self._chunks))

    def check_untouched(self, more: int = 50) -> None:
        """Everything sent during the fault arrives, in order, and more follows."""
        self.read_at_least(len(self.events) + more)
        assert all(e.ok for e in self.events), [e.raw for e in self.events if not e.ok]
        numbers = [e.message["message"]["json_object"]["i"] for e in self.events]
        assert numbers == list(range(len(numbers)))


@dataclass(frozen=True)
class Drill:
    fault: dict[str, Any] = field(default_factory=dict)  # the victim's fault.json
    trigger: dict[str, Any] | None = None  # emit parameters that inject the fault at run time
    env: dict[str, Any] = field(default_factory=dict)
    error: str | None = None  # part of the affected invocation's error message
    restarts: bool = True
    status: int = 200  # what an invocation of the victim gets while the fault lasts


DRILLS = {
    "crash": Drill(trigger={"count": 3, "crash_at": 1}, error="exited (exit code 3)"),
    "hang without heartbeat": Drill(
        fault=BEAT,
        trigger={"count": 1, "stop_heartbeat": True},
        env={"plugin_liveness_timeout": 2},
        error="produced no output for 2 s",
    ),
    "oversized line": Drill(
        trigger={"count": 1, "oversized": 200_000},
        env={"plugin_max_line_bytes": 65536},
        error="wrote a stdout line longer than the 65536 byte limit",
    ),
    "garbage lines": Drill(trigger={"count": 2, "garbage": 50}, restarts=False),
    "stdout closed": Drill(fault={"close_stdout_after_s": 1.0}, error="closed its stdout"),
    "exit during start": Drill(
        fault={"exit_during_start": 7},
        env={"plugin_ready_timeout": 3},
        error="failed to start: exited (exit code 7)",
        status=503,
    ),
    "no heartbeat at start": Drill(
        fault={"no_heartbeat": True},
        env={"plugin_ready_timeout": 3},
        error="sent no heartbeat within 3 s",
        status=503,
    ),
    "slow start": Drill(fault={"start_delay_s": 1.5}, restarts=False),
}


def restart_delays(daemon: Daemon) -> dict[int, list[float]]:
    delays: dict[int, list[float]] = defaultdict(list)
    for slot, delay in re.findall(rf"plugin {VICTIM}: restarting slot (\d+) in ([0-9.]+) s", daemon.log()):
        delays[int(slot)].append(float(delay))
    return delays


@pytest.fixture
def drill_daemon(
    request: pytest.FixtureRequest, start: Callable[..., Daemon], tmp_path: Path
) -> Iterator[tuple[Daemon, Drill]]:
    drill = DRILLS[request.param]
    plugins = tmp_path / "drill-plugins"
    plugins.mkdir()
    copy_plugin("fastproto", plugins, BEAT)
    copy_plugin("fastproto", plugins, drill.fault or None, as_name="victim")
    daemon = start(plugins, plugin_instances=2, **drill.env)
    daemon.wait_ready(FP, instances=2)
    yield daemon, drill


@pytest.mark.parametrize("drill_daemon", list(DRILLS), indirect=True)
def test_a_fault_ends_only_the_affected_sessions_and_the_plugin_restarts_with_backoff(
    drill_daemon: tuple[Daemon, Drill],
) -> None:
    daemon, drill = drill_daemon
    bystander_pids = sorted(daemon.instance_pids(FP))
    with contextlib.ExitStack() as stack:
        client = stack.enter_context(httpx.Client(timeout=120))
        bystander = LongStream(stack, client, daemon, FP)
        neighbour = None
        if drill.trigger is not None:
            # The victim's other instance carries a long session through the fault.
            daemon.wait_ready(VICTIM, instances=2)
            neighbour = LongStream(stack, client, daemon, VICTIM)
            (neighbour_pid,) = [i["pid"] for i in daemon.plugins()[VICTIM]["instances"] if i["sessions"]]
            for round_ in (1, 2) if drill.restarts else (1,):
                # Least busy routing sends the fault to the instance without the long session.
                events = daemon.invoke(VICTIM, "emit", drill.trigger, provider="fastproto")
                check_outcome(events, drill)
                if drill.restarts:
                    wait_for(lambda r=round_: daemon.plugins()[VICTIM]["restarts"] >= r)
                    daemon.wait_ready(VICTIM, instances=2)
        elif drill.error is not None and drill.status == 200:
            # A session open when the fault strikes ends with it.
            events = daemon.invoke(VICTIM, "emit", {"count": 1, "hang": True}, provider="fastproto")
            check_outcome(events, drill)
        elif drill.status != 200:
            wait_for(lambda: daemon.plugins()[VICTIM]["error"])  # the first failed start
            r = client.post(daemon.invoke_url(), **daemon.invocation(VICTIM, "emit", provider="fastproto"))
            assert r.status_code == drill.status, r.text
            assert drill.error is not None and drill.error in r.json()["message"]
        else:
            check_outcome(daemon.invoke(VICTIM, "emit", {"count": 1}, provider="fastproto"), drill)

        if drill.restarts:
            wait_for(lambda: max(map(len, restart_delays(daemon).values()), default=0) >= 2)
            grown = [d for d in restart_delays(daemon).values() if len(d) >= 2 and d[1] > d[0]]
            assert grown, f"no slot restarted twice with a growing delay: {restart_delays(daemon)}"
        else:
            assert daemon.plugins()[VICTIM]["restarts"] == 0

        bystander.check_untouched()
        if neighbour is not None:
            neighbour.check_untouched()
            assert neighbour_pid in daemon.instance_pids(VICTIM)
    plugin = daemon.plugins()[FP]
    assert plugin["restarts"] == 0 and sorted(daemon.instance_pids(FP)) == bystander_pids
    wait_for(lambda: sum(i["sessions"] for i in daemon.plugins()[FP]["instances"]) == 0)
    events = daemon.invoke(FP, "emit", {"count": 1, "variables": 3, "violate": True})
    assert last_error(events)["error_type"] == "ToolOutputValidationError"


def check_outcome(events: list[Event], drill: Drill) -> None:
    """The affected invocation: its messages so far, then the named error (or a clean end)."""
    if drill.error is None:
        assert events and all(e.ok for e in events), [e.raw for e in events]
        return
    error = last_error(events)
    assert error["error_type"] == "PluginInstanceDiedError"
    assert drill.error in error["message"], error
