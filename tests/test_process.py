"""A plugin process's pipes: stdin frames queued per turn of the loop, bounded by flow control;
each pipe's descriptor closed once, by its one owner.

The children here are not plugins: a few lines that sleep, then read slowly, so the pipe fills
and empties as a busy plugin's does; or that exit at once.
"""

from __future__ import annotations

import asyncio
import io
import os
import subprocess
import sys
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any, ClassVar

import pytest
import uvloop

from daemon.manifest import PluginSpec
from daemon.runtime import process
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


class _ProbedPipe(io.FileIO):
    """A pipe end that notes, as it is closed, whether its descriptor was still its own: one
    found closed (or holding another file) was closed by someone else, whose close could as
    well have taken a number another thread had just been handed."""

    def __init__(self, fd: int, mode: str) -> None:
        super().__init__(fd, mode)
        self.inode = os.fstat(fd).st_ino
        self.found_taken: bool | None = None  # None until closed

    def close(self) -> None:
        if not self.closed:
            try:
                self.found_taken = os.fstat(self.fileno()).st_ino != self.inode
            except OSError:
                self.found_taken = True
        super().close()


class _ProbedPopen(subprocess.Popen):  # type: ignore[type-arg]
    """The real Popen, its stdin and stdout ends swapped for probes (each on a duplicate of the
    descriptor; Popen's own file closed once, here)."""

    made: ClassVar[list[_ProbedPipe]] = []  # set by the test

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        for name in ("stdin", "stdout"):
            original = getattr(self, name)
            probe = _ProbedPipe(os.dup(original.fileno()), original.mode)
            original.close()
            setattr(self, name, probe)
            self.made.append(probe)


def _open_on(inode: int) -> list[str]:
    """This process's descriptors still open on the pipe ``inode``."""
    fds = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            if os.readlink(f"/proc/self/fd/{fd}") == f"pipe:[{inode}]":
                fds.append(fd)
        except OSError:
            pass  # the listing's own descriptor, gone already
    return fds


@pytest.mark.parametrize("run", [uvloop.run, asyncio.run], ids=["uvloop", "asyncio"])
def test_a_plugins_pipes_are_closed_once_by_their_one_owner(
    run: Callable[[Coroutine[Any, Any, None]], None], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """uvloop closed a pipe through libuv and then through the file object it was given: a number
    another thread had been handed in between (the reaping thread opens cgroup files) was closed
    under it, and the daemon died of SIGABRT once libuv found one of its own descriptors closed."""
    (tmp_path / "quick_exit.py").write_text("print('bye')\n")
    spec = PluginSpec(tmp_path, "test", "quick", "0.1.0", "3.12", "quick_exit")
    probes: list[_ProbedPipe] = []
    monkeypatch.setattr(_ProbedPopen, "made", probes)
    monkeypatch.setattr(process.subprocess, "Popen", _ProbedPopen)

    async def body() -> None:
        loop = asyncio.get_running_loop()
        transport = ProcessTransport(
            spec, "quick", python=Path(sys.executable), max_line_bytes=1 << 20, loop=loop
        )
        await transport.start(lambda lines: None, lambda outcome: None)
        assert "exited" in await transport.exited
        while not all(probe.closed for probe in probes):  # the transports close after the exit
            await asyncio.sleep(0.01)

    run(asyncio.wait_for(body(), 60))
    assert len(probes) == 2
    assert [probe.found_taken for probe in probes] == [False, False]
    assert [_open_on(probe.inode) for probe in probes] == [[], []]  # nothing left open either


class _ReleaseFails:
    """An instance's resources whose release fails: a cgroup read back as something else."""

    def wrap(self, command: list[str]) -> list[str]:
        return command

    def exit_cause(self, exit_code: int) -> str | None:
        return None

    def release(self) -> None:
        raise ValueError("invalid literal for int() with base 10: 'POST'")


def test_an_instance_whose_resources_fail_to_release_still_ends(tmp_path: Path) -> None:
    """The end of an instance resolves ``exited`` whatever releasing its resources does: the
    pool restarts the slot on it, and a slot whose end never resolved stayed 'ready' forever."""
    (tmp_path / "quick_exit.py").write_text("print('bye')\n")
    spec = PluginSpec(tmp_path, "test", "quick", "0.1.0", "3.12", "quick_exit")
    closed: list[str] = []

    async def body() -> None:
        loop = asyncio.get_running_loop()
        transport = ProcessTransport(
            spec,
            "quick",
            python=Path(sys.executable),
            max_line_bytes=1 << 20,
            loop=loop,
            resources=_ReleaseFails(),  # type: ignore[arg-type]
        )
        await transport.start(lambda lines: None, closed.append)
        assert "exited" in await asyncio.wait_for(asyncio.shield(transport.exited), 30)

    uvloop.run(body())
    assert len(closed) == 1 and "exited" in closed[0]
