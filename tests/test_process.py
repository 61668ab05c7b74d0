"""A plugin process's stdin: frames queued per turn of the loop, bounded by flow control.

The child here is not a plugin: a few lines that sleep, then read slowly, so the pipe fills
and empties as a busy plugin's does.
"""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import uvloop

from daemon.manifest import PluginSpec
from daemon.runtime.process import WRITE_HIGH_WATER, ProcessTransport

SLOW_READER = """
import sys, time
time.sleep(1.0)
while sys.stdin.buffer.read1(65536):
    time.sleep(0.01)
"""


def test_senders_woken_together_queue_no_more_than_flow_control_allows(tmp_path: Path) -> None:
    (tmp_path / "slow_reader.py").write_text(SLOW_READER)
    spec = PluginSpec(tmp_path, "test", "slow", "0.1.0", "3.12", "slow_reader")

    async def body() -> None:
        loop = asyncio.get_running_loop()
        transport = ProcessTransport(
            spec, "slow", python=Path(sys.executable), max_line_bytes=1 << 20, loop=loop
        )
        await transport.start(lambda lines: None, lambda outcome: None)
        try:
            frame = b"x" * 200_000 + b"\n"
            # Forty requests while the child does not read: most wait for the pipe, and all of
            # them wake in one turn when it drains.
            senders = [asyncio.create_task(transport.send(frame)) for _ in range(40)]
            peak = 0
            # Until the child has read everything: a frame queued is not yet a frame written.
            while not all(sender.done() for sender in senders) or transport.queued_bytes:
                peak = max(peak, transport.queued_bytes)
                await asyncio.sleep(0.005)
            assert all(sender.exception() is None for sender in senders)
            assert peak < 2 * WRITE_HIGH_WATER + 2 * len(frame), peak
        finally:
            transport.kill("the test is over")

    uvloop.run(asyncio.wait_for(body(), 120))
