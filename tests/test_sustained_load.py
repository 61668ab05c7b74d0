"""Sustained load: 20,000 invocations of every kind, then nothing leaked and nothing lost.

The mix (by invocation number): valid outputs with variables, schema violations,
tools that raise mid-stream, clients that hang up at the first event, and storage
writes under seven tenants. Every stream is checked against the exact events it
must have. After a warm-up the daemon's memory and descriptors are the baseline;
after each half of the load, with every session ended and the client gone,
descriptors must be back at the baseline exactly and memory must have stopped
growing. Finally every value the plugin stored must be in the storage database.

CPython and glibc keep freed memory for reuse, so RSS never falls back to where it
was; what a leak shows is growth that goes on. glibc's per-thread arenas (one for
each reader and worker thread) grow for tens of thousands of invocations before
they level off, which would hide a small leak, so the daemon runs with
``MALLOC_ARENA_MAX=1``. Tracing stays on, with the trace page's span ring cut to
1,000 spans so that it is full after the warm-up: a full ring holds its memory, a
filling one (20,000 spans by default) would look like a leak. Measured so, the second
half grows by about 1 MiB (~150 to 350 bytes an invocation); keeping every finished
invocation grows it by 40 MiB.
"""

from __future__ import annotations

import sqlite3
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import psutil

from daemon.testing import Daemon, Event, SSEReader, start_daemon
from loadtest.expect import Expect, LoadFailure, fastproto_emit, tool_message, variable
from tests.test_runtime import FP, wait_for

WARM_UP = 5_000
HALF = 7_500  # two halves after the warm-up: 20,000 invocations in all
CONCURRENCY = 16
TENANTS = 7
# Growth that a leak of one small object graph per invocation would exceed (7,500 x 840 bytes).
MAX_GROWTH_PER_HALF = 6 * 2**20
RING_SPANS = 1_000  # the warm-up alone ends more spans than this


@dataclass(frozen=True)
class Planned:
    params: dict[str, Any]
    expect: Expect
    tenant: str = "t1"
    tool: str = "emit"
    leave_early: bool = False


def stored_value(i: int) -> str:
    return f"value {i} ✓"


def plan(i: int) -> Planned:
    """Invocation ``i`` of the mix: 60% valid, 10% invalid, 5% raise, 5% hang up, 20% storage."""
    kind = i % 20
    if kind < 12:
        params, expect = fastproto_emit(count=2, variables=3, stream_chunks=3)
    elif kind < 14:
        params, expect = fastproto_emit(count=2, variables=3, violate=True)
    elif kind < 15:
        params, expect = fastproto_emit(count=3, variables=2, error_at=2)
    elif kind < 16:
        return Planned({"count": 50, "delay_ms": 2}, Expect(), leave_early=True)
    else:
        text = tool_message("text", {"text": stored_value(i)})
        params = {"count": 0, "storage_key": f"key-{i}", "storage_value": stored_value(i)}
        expect = Expect((text, variable("done", True)))
        return Planned(params, expect, tenant=f"tenant-{i % TENANTS}", tool="plain")
    return Planned(params, expect)


def invoke(client: httpx.Client, daemon: Daemon, i: int) -> str:
    """Run invocation ``i``; return its outcome ("ok", "left early" or what was wrong)."""
    planned = plan(i)
    request = daemon.invocation(FP, planned.tool, planned.params)
    reader, events = SSEReader(), list[Event]()
    with client.stream("POST", daemon.invoke_url(planned.tenant), **request) as response:
        if response.status_code != 200:
            return f"HTTP {response.status_code}"
        for chunk in response.iter_raw():
            events += reader.feed(chunk)
            if planned.leave_early and events:
                return "left early" if events[0].ok else "first event is an error"
    if reader.pending:
        return "truncated event"
    try:
        planned.expect.check(events)
    except LoadFailure as failure:
        return f"{failure.kind}: {failure}"
    return "ok"


def run(daemon: Daemon, first: int, count: int) -> Counter[str]:
    """Invocations ``first`` to ``first + count``, ``CONCURRENCY`` at a time.

    Threads with a blocking client: on two shared cores httpx's async pool costs
    several times more CPU per request than the daemon does.
    """
    limits = httpx.Limits(max_connections=CONCURRENCY)
    with httpx.Client(timeout=120, limits=limits) as client, ThreadPoolExecutor(CONCURRENCY) as pool:
        return Counter(pool.map(lambda i: invoke(client, daemon, i), range(first, first + count)))


def expected_outcomes(first: int, count: int) -> Counter[str]:
    return Counter("left early" if plan(i).leave_early else "ok" for i in range(first, first + count))


@dataclass(frozen=True)
class Usage:
    rss: int
    fds: int


def settled_usage(daemon: Daemon) -> Usage:
    """The daemon's memory and descriptors once every session has ended and sockets closed."""
    wait_for(lambda: all(i["sessions"] == 0 for i in daemon.plugins()[FP]["instances"]))
    process = psutil.Process(daemon.proc.pid)
    readings: list[Usage] = []

    def steady() -> bool:
        readings.append(Usage(process.memory_info().rss, process.num_fds()))
        return len(readings) >= 3 and len({u.fds for u in readings[-3:]}) == 1

    wait_for(steady)
    return readings[-1]


def test_20000_invocations_leak_nothing_and_lose_nothing(
    fastproto: Callable[..., Path], tmp_path: Path
) -> None:
    state = tmp_path / "state"
    daemon = start_daemon(
        fastproto(),
        state,
        tmp_path / "daemon.log",
        plugin_instances=2,
        malloc_arena_max=1,
        trace_ring_spans=RING_SPANS,
    )
    try:
        total = load_and_measure(daemon)
    finally:
        daemon.stop()
    db = sqlite3.connect(state / "state.sqlite3")
    query = "SELECT tenant_id, plugin_id, key, value FROM plugin_storage"
    rows = {(t, p, k): bytes(v) for t, p, k, v in db.execute(query)}
    db.close()
    written = [i for i in range(total) if plan(i).tool == "plain"]
    assert len(written) == total // 5
    assert rows == {(f"tenant-{i % TENANTS}", FP, f"key-{i}"): stored_value(i).encode() for i in written}


def load_and_measure(daemon: Daemon) -> int:
    """The whole load with its checks; returns how many invocations ran."""
    daemon.wait_ready(FP, instances=2)
    started = time.monotonic()
    assert run(daemon, 0, WARM_UP) == expected_outcomes(0, WARM_UP)
    baseline = settled_usage(daemon)
    assert run(daemon, WARM_UP, HALF) == expected_outcomes(WARM_UP, HALF)
    middle = settled_usage(daemon)
    assert run(daemon, WARM_UP + HALF, HALF) == expected_outcomes(WARM_UP + HALF, HALF)
    end = settled_usage(daemon)
    total = WARM_UP + 2 * HALF
    print(
        f"{total} invocations in {time.monotonic() - started:.0f} s; daemon RSS MiB "
        f"{baseline.rss / 2**20:.1f} -> {middle.rss / 2**20:.1f} -> {end.rss / 2**20:.1f}, "
        f"fds {baseline.fds} -> {middle.fds} -> {end.fds}"
    )
    assert end.fds == baseline.fds == middle.fds
    assert end.rss - middle.rss <= MAX_GROWTH_PER_HALF
    assert middle.rss - baseline.rss <= MAX_GROWTH_PER_HALF
    plugin = daemon.plugins()[FP]
    assert plugin["restarts"] == 0 and all(i["state"] == "ready" for i in plugin["instances"])
    log = daemon.log()
    assert "Traceback" not in log and "fell too far behind" not in log
    return total
