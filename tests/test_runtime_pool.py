"""A plugin pool in this process, on both event loops, with real fastproto subprocesses.

These reach what the HTTP API cannot: the loop the runtime runs on, the process's
file-descriptor limit, the signals it sends and the bytes it queues for a plugin.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import resource
import signal
import uuid
from collections.abc import AsyncIterator, Callable, Coroutine
from pathlib import Path
from typing import Any

import pytest
import uvloop

from daemon.config import Settings
from daemon.manifest import discover
from daemon.runtime import PluginPool
from daemon.runtime.backwards import BackwardsServices
from daemon.session import Session
from daemon.state import Database, PluginStorage
from daemon.testing import copy_plugin
from daemon.wire import get_codec, tool_request

LOOPS: dict[str, Callable[[], asyncio.AbstractEventLoop]] = {
    "asyncio": asyncio.new_event_loop,
    "uvloop": uvloop.new_event_loop,
}


@pytest.fixture(params=list(LOOPS))
def run(request: pytest.FixtureRequest) -> Callable[[Coroutine[Any, Any, None]], None]:
    """Run a test body on the stdlib loop and on uvloop."""

    def _run(body: Coroutine[Any, Any, None]) -> None:
        with asyncio.Runner(loop_factory=LOOPS[request.param]) as runner:
            runner.run(asyncio.wait_for(body, 120))  # only keeps a broken build from hanging

    return _run


@contextlib.asynccontextmanager
async def running_pool(
    tmp_path: Path, fault: dict[str, Any] | None = None, **env: Any
) -> AsyncIterator[PluginPool]:
    plugins = tmp_path / "plugins"
    plugins.mkdir(exist_ok=True)
    copy_plugin("fastproto", plugins, fault)
    (spec,), _ = discover(plugins)
    settings = Settings(state_dir=tmp_path / "state", plugin_restart_backoff_max=0.5, **env)
    database = Database.from_settings(settings)
    database.migrate()
    services = BackwardsServices(PluginStorage(database))
    pool = PluginPool(spec, settings=settings, codec=get_codec("orjson"), services=services)
    task = asyncio.create_task(pool.run())
    try:
        yield pool
    finally:
        pool.stop()
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        waits = [i.exited for i in pool.instances if i is not None]
        if waits:
            await asyncio.wait(waits, timeout=10)
        database.close()


async def until(predicate: Callable[[], Any]) -> Any:
    while not (value := predicate()):
        await asyncio.sleep(0.02)
    return value


def new_session(pool: PluginPool) -> Session:
    return Session(
        uuid.uuid4().hex,
        asyncio.get_running_loop(),
        buffer_bytes=1 << 20,
        variables=None,
        tenant_id="t1",
        plugin_id=pool.spec.id,
    )


def test_a_dead_instance_is_restarted_on_either_loop(run: Callable[..., None], tmp_path: Path) -> None:
    async def body() -> None:
        async with running_pool(tmp_path) as pool:
            first = await pool.acquire(60)
            os.kill(first.pid, signal.SIGKILL)
            await until(lambda: pool.restarts >= 1)
            second = await pool.acquire(60)
            assert second is not first and second.pid != first.pid
            assert pool.status == "ready"

    run(body())


def test_running_out_of_file_descriptors_is_a_failed_start_that_is_retried(
    run: Callable[..., None], tmp_path: Path
) -> None:
    async def body() -> None:
        async with running_pool(tmp_path) as pool:
            first = await pool.acquire(60)
            soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
            open_now = len(os.listdir("/proc/self/fd"))
            resource.setrlimit(resource.RLIMIT_NOFILE, (open_now + 1, hard))  # no room for a pipe pair
            try:
                os.kill(first.pid, signal.SIGKILL)
                await until(lambda: pool.error and os.strerror(errno.EMFILE) in pool.error)
            finally:
                resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
            again = await pool.acquire(60)
            assert again.pid is not None and again.pid != first.pid

    run(body())


def test_a_reaped_process_is_never_signalled(
    run: Callable[..., None], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    signalled: list[int] = []
    real_killpg = os.killpg

    def killpg(pgid: int, sig: int) -> None:
        signalled.append(pgid)
        real_killpg(pgid, sig)

    async def body() -> None:
        async with running_pool(tmp_path) as pool:
            instance = await pool.acquire(60)
            os.kill(instance.pid, signal.SIGKILL)
            await instance.exited
            monkeypatch.setattr(os, "killpg", killpg)
            instance.kill("a late liveness check")
            instance.stop()
            assert signalled == []

    run(body())


def _write_calls() -> int:
    """The write system calls this process (the daemon's side of the pipes) has made so far."""
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith("syscw:"):
            return int(line.split()[1])
    raise AssertionError("no syscw in /proc/self/io")


def test_requests_sent_in_one_turn_of_the_loop_reach_the_plugin_in_one_write(
    run: Callable[..., None], tmp_path: Path
) -> None:
    async def body() -> None:
        async with running_pool(tmp_path) as pool:
            instance = await pool.acquire(60)
            sessions = [new_session(pool) for _ in range(50)]
            data = {"provider": "fastproto", "tool": "emit", "tool_parameters": {}}
            requests = [tool_request(s.id, user_id="u", action="invoke_tool", data=data) for s in sessions]
            before = _write_calls()
            # One turn: every task sends before the loop writes anything.
            await asyncio.gather(
                *(instance.open_session(s, r) for s, r in zip(sessions, requests, strict=True))
            )
            await asyncio.sleep(0)  # the turn in which the frames are written
            assert _write_calls() - before <= 2  # one write (not one per request)
            await until(lambda: all(s.closed for s in sessions))
            for s in sessions:  # every request answered, in its own session
                assert await s.next_batch() and await s.next_batch() == []
                instance.release(s)

    run(body())


def test_requests_wait_while_a_plugin_does_not_read_its_stdin(
    run: Callable[..., None], tmp_path: Path
) -> None:
    async def body() -> None:
        async with running_pool(tmp_path, {"stall_stdin": True}) as pool:
            instance = await pool.acquire(60)
            pad = "x" * 200_000
            opens = []
            for _ in range(40):  # 8 MB of requests for a plugin that reads none of them
                session = new_session(pool)
                request = tool_request(session.id, user_id="u", action="invoke_tool", data={"pad": pad})
                opens.append(asyncio.create_task(instance.open_session(session, request)))
            await asyncio.sleep(0.5)
            assert sum(not t.done() for t in opens) >= 30
            assert instance.transport.queued_bytes < 2 * 256 * 1024 + len(pad) + 1024
            for task in opens:
                task.cancel()

    run(body())
