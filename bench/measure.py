"""One trial: drive a server with a workload and read its own CPU and memory accounting.

CPU is the server process's user+system time (all its threads, not its plugin
child) from the kernel's per-process accounting, read before and after the trial;
µs per event divides it by the SSE events the client received. RSS is sampled
every 20 ms during the trial (peak), besides the kernel's lifetime high-water mark.
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass
from typing import Any

import psutil

from bench.loadgen import percentile, request_bytes, run_load
from bench.servers import Server

INVOKE_PATH = "/plugin/t1/dispatch/tool/invoke"


@dataclass(frozen=True)
class Workload:
    """What each invocation asks fastproto's ``emit`` for, and how many run at once."""

    size: int = 16
    count: int = 16
    variables: int = 4
    concurrency: int = 16
    tool: str = "emit"

    @property
    def events_per_invocation(self) -> int:
        return self.count + self.variables + 1  # + the final `done` variable

    def body(self) -> dict[str, Any]:
        params = {"count": self.count, "size": self.size, "variables": self.variables}
        return {
            "user_id": "bench",
            "data": {"provider": "fastproto", "tool": self.tool, "tool_parameters": params},
        }


def _cpu_times(processes: list[psutil.Process]) -> tuple[float, float]:
    """(user, system) seconds summed over ``processes``; one that is gone counts 0."""
    user = system = 0.0
    for process in processes:
        with contextlib.suppress(psutil.Error):
            times = process.cpu_times()
            user, system = user + times.user, system + times.system
    return user, system


def _hwm_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


async def _trial(server: Server, workload: Workload, duration: float, warmup: float) -> dict[str, Any]:
    request = request_bytes("127.0.0.1", server.port, INVOKE_PATH, server.headers, workload.body())
    if warmup > 0:
        await run_load("127.0.0.1", server.port, request, concurrency=workload.concurrency, duration=warmup)
    process = server.process
    rss_before = process.memory_info().rss
    peak = rss_before
    sampling = True

    async def sample() -> None:
        nonlocal peak
        while sampling:
            with contextlib.suppress(psutil.Error):
                peak = max(peak, process.memory_info().rss)
            await asyncio.sleep(0.02)

    plugins = [psutil.Process(pid) for pid in server.plugin_pids()]
    client = psutil.Process()
    sampler = asyncio.create_task(sample())
    user0, system0 = _cpu_times([process])
    plugin0, client0 = sum(_cpu_times(plugins)), sum(_cpu_times([client]))
    load = await run_load(
        "127.0.0.1", server.port, request, concurrency=workload.concurrency, duration=duration
    )
    user1, system1 = _cpu_times([process])
    plugin1, client1 = sum(_cpu_times(plugins)), sum(_cpu_times([client]))
    cpu = (user1 - user0) + (system1 - system0)
    sampling = False
    await sampler
    events = max(load.events, 1)
    return {
        "invocations": load.invocations,
        "events": load.events,
        "events_expected": load.invocations * workload.events_per_invocation,
        "body_bytes": load.body_bytes,
        "elapsed_s": load.elapsed,
        "events_per_s": load.events / load.elapsed,
        "invocations_per_s": load.invocations / load.elapsed,
        "cpu_s": cpu,
        "cpu_us_per_event": cpu / events * 1e6,
        "cpu_system_share": (system1 - system0) / cpu if cpu else 0.0,
        "cpu_share": cpu / load.elapsed,  # cores busy on average
        "plugin_cpu_share": (plugin1 - plugin0) / load.elapsed,
        "client_cpu_share": (client1 - client0) / load.elapsed,
        "ttfe_p50_ms": percentile(load.ttfe, 50) * 1e3 if load.ttfe else None,
        "ttfe_p99_ms": percentile(load.ttfe, 99) * 1e3 if load.ttfe else None,
        "ttfe_max_ms": max(load.ttfe) * 1e3 if load.ttfe else None,
        "rss_before_bytes": rss_before,
        "rss_peak_bytes": peak,
        "rss_hwm_bytes": _hwm_bytes(server.pid),
        "outcomes": dict(load.outcomes),
    }


def trial(server: Server, workload: Workload, duration: float, warmup: float) -> dict[str, Any]:
    """Run one measured trial (after an unmeasured warm-up) against a running server."""
    import uvloop

    return uvloop.run(_trial(server, workload, duration, warmup))
