"""Daemon CPU per invocation next to the SDK plugin's, for 1, 2 and 4 plugin instances.

    python -m bench.scaling                         # 1, 2, 4 instances, 5 s each
    python -m bench.scaling --instances 1 2 4 8 --duration 8 --repeats 2

One daemon per instance count serves the SDK-based ``text_toolkit`` plugin (its
``word_stats`` tool: a text event, a JSON event, three output variables validated
against its output schema) under the closed-loop load. The daemon's own CPU (its
threads, from ``/proc``) and its plugin processes' CPU are each divided by the
invocations completed: invocations/s scale with instances for as long as the plugin
processes, not the daemon, are what fills the cores. Counts run interleaved (1 2 4
1 2 4 ...) so a shared machine's drift hits them alike.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
from pathlib import Path
from typing import Any

import psutil

from bench.loadgen import request_bytes, run_load
from bench.servers import prepare_environment
from daemon.testing import Daemon, copy_plugin, start_daemon

PLUGIN_ID = "demo/text_toolkit"
PATH = "/plugin/t1/dispatch/tool/invoke"
BODY = {
    "user_id": "bench",
    "data": {
        "provider": "text_toolkit",
        "tool": "word_stats",
        "tool_parameters": {"text": "the quick brown fox jumps over the lazy dog the end"},
    },
}


def _cpu(processes: list[psutil.Process]) -> float:
    total = 0.0
    for process in processes:
        try:
            times = process.cpu_times()
        except psutil.Error:
            continue
        total += times.user + times.system
    return total


async def _trial(daemon: Daemon, duration: float, concurrency: int) -> dict[str, Any]:
    port = int(daemon.url.rsplit(":", 1)[1])
    request = request_bytes("127.0.0.1", port, PATH, daemon.headers(PLUGIN_ID), BODY)
    await run_load("127.0.0.1", port, request, concurrency=concurrency, duration=0.5)  # warm-up
    server = psutil.Process(daemon.proc.pid)
    plugins = server.children(recursive=True)
    server0, plugins0 = _cpu([server]), _cpu(plugins)
    load = await run_load("127.0.0.1", port, request, concurrency=concurrency, duration=duration)
    server1, plugins1 = _cpu([server]), _cpu(plugins)
    invocations = max(load.invocations, 1)
    return {
        "invocations_per_s": load.invocations / load.elapsed,
        "daemon_us": (server1 - server0) / invocations * 1e6,
        "plugins_us": (plugins1 - plugins0) / invocations * 1e6,
        "daemon_cores": (server1 - server0) / load.elapsed,
        "plugins_cores": (plugins1 - plugins0) / load.elapsed,
        "outcomes": dict(load.outcomes),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--instances", type=int, nargs="*", default=[1, 2, 4])
    parser.add_argument("--duration", type=float, default=5.0)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--concurrency", type=int, default=16)
    args = parser.parse_args()
    prepare_environment()
    daemons: dict[int, Daemon] = {}
    results: dict[int, list[dict[str, Any]]] = {n: [] for n in args.instances}
    with tempfile.TemporaryDirectory(prefix="bench-scaling-") as tmp:
        try:
            for n in args.instances:
                work = Path(tmp) / str(n)
                (work / "plugins").mkdir(parents=True)
                copy_plugin("text_toolkit", work / "plugins")
                daemons[n] = start_daemon(
                    work / "plugins",
                    work / "state",
                    work / "daemon.log",
                    plugin_instances=n,
                    otel_sdk_disabled="true",
                )
                daemons[n].wait_ready(PLUGIN_ID)
            for repeat in range(args.repeats):
                for n in args.instances:
                    result = asyncio.run(_trial(daemons[n], args.duration, args.concurrency))
                    results[n].append(result)
                    print(f"{n} instance(s) r{repeat}: {result}", flush=True)
        finally:
            for daemon in daemons.values():
                daemon.stop()
    base = statistics.median(r["invocations_per_s"] for r in results[args.instances[0]])
    print("| instances | inv/s | vs first | daemon µs/inv | plugins µs/inv | daemon cores | plugin cores |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for n in args.instances:
        rows = results[n]

        def med(key: str, rows: list[dict[str, Any]] = rows) -> float:
            return statistics.median(r[key] for r in rows)

        print(
            f"| {n} | {med('invocations_per_s'):.0f} | {med('invocations_per_s') / base:.2f}x "
            f"| {med('daemon_us'):.0f} | {med('plugins_us'):.0f} "
            f"| {med('daemon_cores'):.2f} | {med('plugins_cores'):.2f} |"
        )


if __name__ == "__main__":
    main()
