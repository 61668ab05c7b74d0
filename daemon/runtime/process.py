"""A transport that is a child process: spawn, frame stdout into lines, write stdin, kill, reap.

The process runs ``<venv>/bin/python -m <entrypoint>`` in the plugin directory, in its own
process group, with a minimal environment (``INSTALL_METHOD=local``; never the server key)
and ``PR_SET_PDEATHSIG`` (via ``setpriv``) so it dies with the daemon.

Stdout is read by an asyncio pipe protocol on the event loop: it splits lines (bounded
length) and hands each chunk's lines to the connection in one callback, which closes a
session when its ``end`` arrives, before the session's consumer (the request's task) has run:
the closer and the consumer are different tasks, which is the race the validator designs
differ on. (A reader thread with a hand-off to the loop per chunk cost more CPU per
invocation than the rest of the relay's reading; ``bench/HISTORY.md``.) The end of the stream
is handled on a short-lived thread, because reaping waits for the process. The end of the
stream is not the end of the process: a child the plugin started in a session of its own (out
of reach of the group kill) can hold stdout and stderr open for ever. So a thread waits for the
process itself, and once it has exited gives stdout a moment to drain, then ends the stream
(and the stderr thread stops once the process is reaped). A stderr thread
keeps a bounded tail for the pool's ``failed`` state and logs at a bounded rate. Writes go
through an asyncio pipe transport with flow control: :meth:`send` waits while the plugin is
not reading, so requests cannot pile up in the daemon. Frames sent in one turn of the event
loop leave in one write: under load several requests arrive per turn, and each write to the
pipe is a system call that may wake the plugin.

The exit cause is a value: :attr:`exited` resolves to "<cause> (exit code N)".
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import os
import select
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import IO

import uvloop

from daemon.errors import INSTANCE_DIED
from daemon.manifest import PluginSpec
from daemon.resources.monitor import InstanceResources
from daemon.runtime.plugin_log import LogBudget

log = logging.getLogger("daemon.runtime")

READ_CHUNK = 256 * 1024
WRITE_HIGH_WATER = 256 * 1024  # bytes queued for a plugin's stdin before send() waits
STDERR_LINE_CHARS = 2000  # longer stderr lines are cut (the rest is read and dropped)
STDERR_TAIL_LINES = 20  # kept for GET /plugins when the plugin fails to start
EXIT_DRAIN_SECONDS = 1.0  # how long a pipe may stay open after the process exits (a child holds it)
_SETPRIV = shutil.which("setpriv")

LinesHandler = Callable[[list[bytes]], None]


def plugin_environment(venv_python: Path) -> dict[str, str]:
    """The whole environment a plugin gets: enough to run, nothing secret."""
    env = {
        "PATH": f"{venv_python.parent}:/usr/local/bin:/usr/bin:/bin",
        "INSTALL_METHOD": "local",
        "PYTHONUNBUFFERED": "1",
        "LANG": "C.UTF-8",
    }
    for name in ("HOME", "TZ"):
        if name in os.environ:
            env[name] = os.environ[name]
    return env


def handed_to_transport(loop: asyncio.AbstractEventLoop, pipe: IO[bytes]) -> IO[bytes]:
    """``pipe`` as ``loop``'s pipe transport must get it for its descriptor to be closed once.

    uvloop's pipe transport closes the descriptor through libuv, then calls the file object's
    ``close()`` as well (MagicStack/uvloop#763). A number that another thread was handed in
    between (the thread that reaps an instance opens its cgroup files) is closed under that
    thread, which then closes whatever holds the number next: a pipe or a socket libuv watches,
    and libuv aborts the daemon (SIGABRT, no message) when it finds one of its descriptors closed.
    So libuv gets a duplicate to close alone, behind a file object that does not close it, and
    the original is closed here, once. The stdlib loop closes a pipe only through its file object.
    """
    if not isinstance(loop, uvloop.Loop):
        return pipe
    duplicate = os.dup(pipe.fileno())
    pipe.close()
    return open(duplicate, pipe.mode, buffering=0, closefd=False)


class _FlowControl(asyncio.Protocol):
    """Lets :meth:`ProcessTransport.send` wait while the pipe's buffer is above its high-water mark."""

    def __init__(self) -> None:
        self._resumed = asyncio.Event()
        self._resumed.set()
        self.paused = False

    def pause_writing(self) -> None:
        self.paused = True
        self._resumed.clear()

    def resume_writing(self) -> None:
        self.paused = False
        self._resumed.set()

    def connection_lost(self, exc: Exception | None) -> None:
        self.paused = False
        self._resumed.set()  # nobody waits on a dead pipe

    async def drained(self) -> None:
        await self._resumed.wait()


class _StdoutReader(asyncio.Protocol):
    """Frames a plugin's stdout into lines on the event loop; its end goes to ``on_end(reason)``."""

    def __init__(
        self, transport: ProcessTransport, on_lines: LinesHandler, on_end: Callable[[str], None]
    ) -> None:
        self._owner = transport
        self._on_lines = on_lines
        self._on_end = on_end
        self._limit = transport._max_line
        self._pending = b""
        self._pipe: asyncio.ReadTransport | None = None
        self._reason: str | None = None  # why reading stopped early (before EOF)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._pipe = transport  # type: ignore[assignment]

    def data_received(self, chunk: bytes) -> None:
        if self._reason is not None:
            return
        self._owner.last_output = time.monotonic()
        data = self._pending + chunk if self._pending else chunk
        lines = data.split(b"\n")
        self._pending = pending = lines.pop()
        limit = self._limit
        if len(pending) > limit or max(map(len, lines), default=0) > limit:
            self._stop(f"wrote a stdout line longer than the {limit} byte limit")
            log.error("plugin %s %s; failing the instance", self._owner.name, self._reason)
            return
        try:
            self._on_lines(lines)
        except Exception as exc:  # a bug here must not leave sessions hanging
            log.exception("plugin %s: reader failed", self._owner.name)
            self._stop(f"reader failed: {exc!r}")

    def _stop(self, reason: str) -> None:
        self._reason = reason
        if self._pipe is not None:
            self._pipe.close()  # connection_lost follows, and ends the instance

    def eof_received(self) -> bool:
        return False  # close the pipe: connection_lost follows

    def connection_lost(self, exc: Exception | None) -> None:
        reason = self._reason or (f"reader failed: {exc!r}" if exc is not None else "")
        # Reaping waits for the process (up to a second after EOF): not on the loop.
        name = f"end {self._owner.name}"
        threading.Thread(target=self._on_end, args=(reason,), name=name, daemon=True).start()


class StderrTail:
    """A plugin's stderr: a bounded tail of lines, copied into the log at a bounded rate."""

    def __init__(self, name: str) -> None:
        self._name = name
        self._lines: collections.deque[str] = collections.deque(maxlen=STDERR_TAIL_LINES)
        self._lock = threading.Lock()  # the stderr thread appends, the loop takes snapshots
        self.done = threading.Event()  # set when the stream has ended
        self._budget = LogBudget(name, "stderr")

    def add(self, raw: bytes) -> None:
        line = raw.decode(errors="replace").rstrip()
        if not line:
            return
        with self._lock:
            self._lines.append(line[:STDERR_LINE_CHARS])
        if self._budget.allow(len(raw)):
            log.info("plugin %s stderr: %s", self._name, line[:STDERR_LINE_CHARS])

    def close(self) -> None:
        self._budget.flush()
        self.done.set()

    def snapshot(self) -> list[str]:
        with self._lock:
            return list(self._lines)

    async def last_lines(self, wait: float = 1.0) -> list[str]:
        """The tail, once the stream has ended (or after ``wait`` s: the process may live on)."""
        await asyncio.to_thread(self.done.wait, wait)
        return self.snapshot()


class ProcessTransport:
    """One plugin process: its pipes, its threads, its exit."""

    death_error_type = INSTANCE_DIED

    def __init__(
        self,
        spec: PluginSpec,
        name: str,
        *,
        python: Path,
        max_line_bytes: int,
        loop: asyncio.AbstractEventLoop,
        drop_privileges: Sequence[str] = (),
        resources: InstanceResources | None = None,
    ) -> None:
        self.spec = spec
        self.resources = resources  # its cgroup and the cause of an OOM kill (daemon/resources)
        self._drop_privileges = list(drop_privileges)  # setpriv options: the plugin's own uid
        self.name = name
        self._python = python
        self._max_line = max_line_bytes
        self._loop = loop
        self.pid: int | None = None
        self.last_output = time.monotonic()
        self.stderr = StderrTail(name)
        self.exited: asyncio.Future[str] = loop.create_future()
        self._proc: subprocess.Popen[bytes] | None = None
        self._stdin: asyncio.WriteTransport | None = None
        self._stdout: asyncio.ReadTransport | None = None
        self._flow: _FlowControl | None = None
        self._outgoing: list[bytes] = []  # frames of this turn of the loop, written at its end
        self._outgoing_bytes = 0
        self._kill_reason: str | None = None
        # Held while signalling and while reaping: a reaped pid may belong to someone else.
        self._reap_lock = threading.Lock()
        self._reaped = False
        self._reaped_at = 0.0
        self._stream_ended = threading.Event()  # set once stdout's end is being handled

    async def start(self, on_lines: LinesHandler, on_close: Callable[[str], None]) -> None:
        """Spawn; ``on_lines`` is called on the loop, then ``on_close(outcome)`` on another thread."""
        cmd = [str(self._python), "-m", self.spec.entrypoint]
        if _SETPRIV:
            cmd = [_SETPRIV, "--pdeathsig", "KILL", *self._drop_privileges, "--", *cmd]
        if self.resources is not None:
            cmd = self.resources.wrap(cmd)  # outermost: enters the instance's cgroup, then execs
        # Popen runs on the loop thread on purpose: PDEATHSIG fires when the *thread*
        # that forked the child exits, and the loop thread lives as long as we do.
        self._proc = subprocess.Popen(
            cmd,
            cwd=self.spec.path,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=plugin_environment(self._python),
            start_new_session=True,
            bufsize=0,
        )
        self.pid = self._proc.pid
        try:
            stdin = handed_to_transport(self._loop, self._proc.stdin)
            self._stdin, self._flow = await self._loop.connect_write_pipe(_FlowControl, stdin)
            self._stdin.set_write_buffer_limits(high=WRITE_HIGH_WATER)
            threading.Thread(target=self._read_stderr, name=f"stderr {self.name}", daemon=True).start()
            # The pipe transport owns the descriptor from here on (and closes it).
            self._stdout, _ = await self._loop.connect_read_pipe(
                lambda: _StdoutReader(self, on_lines, lambda reason: self._end(reason, on_close)),
                handed_to_transport(self._loop, self._proc.stdout),
            )
        except BaseException:
            self.kill("failed to start its reader")
            await asyncio.to_thread(self._reap)
            raise
        threading.Thread(target=self._watch_exit, name=f"exit {self.name}", daemon=True).start()
        log.info("plugin %s: spawned pid %d", self.name, self.pid)

    @property
    def queued_bytes(self) -> int:
        """Bytes written for the plugin that it has not read yet (bounded by flow control)."""
        buffered = self._stdin.get_write_buffer_size() if self._stdin is not None else 0
        return buffered + self._outgoing_bytes

    async def send(self, data: bytes) -> None:
        """Queue one frame, waiting first while the plugin is not reading its stdin; the frames
        of one turn of the loop are written together, in order, at its end."""
        flow = self._flow
        # Again after each wait: every sender waiting for the pipe wakes in the same turn.
        while flow is not None and (flow.paused or self._outgoing_bytes >= WRITE_HIGH_WATER):
            self._write_outgoing()  # the pipe's own buffer decides whether to wait
            await flow.drained()
        if not self._outgoing:
            self._loop.call_soon(self._write_outgoing)
        self._outgoing.append(data)
        self._outgoing_bytes += len(data)

    def _write_outgoing(self) -> None:
        frames, self._outgoing, self._outgoing_bytes = self._outgoing, [], 0
        if frames and self._stdin is not None and not self._stdin.is_closing():
            self._stdin.write(frames[0] if len(frames) == 1 else b"".join(frames))

    def kill(self, reason: str) -> None:
        """Kill the process group (once reaped, never: the pid may be reused)."""
        if self._kill_reason is None:
            self._kill_reason = reason
        with self._reap_lock:
            if self._proc is not None and not self._reaped:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(self._proc.pid, signal.SIGKILL)

    @property
    def kill_reason(self) -> str | None:
        return self._kill_reason

    # -- the end of the stream, and the stderr thread ---------------------------------

    def _end(self, reason: str, on_close: Callable[[str], None]) -> None:
        """Stdout ended (``reason`` if reading stopped early): kill, reap, report the cause once."""
        assert self._proc is not None
        self._stream_ended.set()
        if not reason:
            # EOF usually means exit: give it a moment.
            reason = "exited" if self._exited_within(1.0) else "closed its stdout"
        try:
            killed_for = self._kill_reason  # a kill asked for before the stream ended names the cause
            self.kill(reason)  # stdout may have closed while the process lives on
            code = self._reap()
            memory = self.resources.exit_cause(code) if self.resources is not None else None
            outcome = f"{killed_for or memory or reason} (exit code {code})"
        except Exception as exc:  # pragma: no cover - reaping our own child does not fail
            log.exception("plugin %s: reaping failed", self.name)
            outcome = f"{reason} (not reaped: {exc!r})"
        try:
            on_close(outcome)
        finally:
            if self.resources is not None:
                try:
                    self.resources.release()  # after the sessions have their error, before a restart
                except Exception:  # the process is gone all the same: its slot must learn it
                    log.exception("plugin %s: releasing its resources failed", self.name)
            with contextlib.suppress(RuntimeError):  # the loop is gone at interpreter exit
                self._loop.call_soon_threadsafe(self._set_exited, outcome)

    def _watch_exit(self) -> None:
        """Wait for the process itself; if its stdout outlives it (a detached child inherited
        it), end the stream after a moment for the last lines, as an EOF would."""
        assert self._proc is not None
        with contextlib.suppress(ChildProcessError):
            os.waitid(os.P_PID, self._proc.pid, os.WEXITED | os.WNOWAIT)  # exited, not reaped
        if self._stream_ended.wait(EXIT_DRAIN_SECONDS):
            return
        log.warning("plugin %s: exited, but a child of it holds its stdout open", self.name)
        with contextlib.suppress(RuntimeError):  # the loop is gone at interpreter exit
            self._loop.call_soon_threadsafe(self._close_stdout)

    def _close_stdout(self) -> None:
        if self._stdout is not None and not self._stdout.is_closing():
            self._stdout.close()  # the reader's connection_lost follows, as at EOF

    def _exited_within(self, seconds: float) -> bool:
        assert self._proc is not None
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            # WNOWAIT: look without reaping, so kill() stays safe until _reap().
            with contextlib.suppress(ChildProcessError):
                info = os.waitid(os.P_PID, self._proc.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
                if info is not None:
                    return True
            time.sleep(0.02)
        return False

    def _reap(self) -> int:
        assert self._proc is not None
        with contextlib.suppress(ChildProcessError):
            os.waitid(os.P_PID, self._proc.pid, os.WEXITED | os.WNOWAIT)  # exited, not yet reaped
        with self._reap_lock:
            code = self._proc.wait()
            self._reaped_at = time.monotonic()
            self._reaped = True
        return code

    def _read_stderr(self) -> None:
        """Bounded: a line without a newline is cut at the line limit, the rest read and dropped."""
        assert self._proc is not None and self._proc.stderr is not None
        fd = self._proc.stderr.fileno()
        limit = STDERR_LINE_CHARS * 4  # bytes: room for any UTF-8 text of the kept length
        pending = b""
        overlong = False  # the current line already hit the limit; drop until its newline
        poller = select.poll()  # not select(): the daemon's descriptors may exceed FD_SETSIZE
        poller.register(fd, select.POLLIN)
        try:
            while True:
                readable = poller.poll(500)
                # Once the process is reaped, a child that inherited stderr must not keep us.
                if self._reaped and (not readable or time.monotonic() - self._reaped_at > EXIT_DRAIN_SECONDS):
                    break
                if not readable:
                    continue
                chunk = os.read(fd, READ_CHUNK)
                if not chunk:
                    break
                *lines, rest = chunk.split(b"\n")
                for line in lines:
                    if not overlong:
                        self.stderr.add(pending + line)
                    pending, overlong = b"", False
                if not overlong:
                    pending += rest
                    if len(pending) > limit:
                        self.stderr.add(pending[:limit] + b" [cut]")
                        pending, overlong = b"", True
            if pending and not overlong:
                self.stderr.add(pending)
        except (OSError, ValueError):
            pass
        finally:
            self._proc.stderr.close()
            self.stderr.close()

    def _set_exited(self, outcome: str) -> None:
        if not self.exited.done():
            self.exited.set_result(outcome)
        if self._stdout is not None and not self._stdout.is_closing():
            self._stdout.close()
        if self._stdin is not None and not self._stdin.is_closing():
            # On the stdlib loop the pipe's own watcher may have closed it half-way;
            # abort() then raises, and must not stop anything that follows.
            with contextlib.suppress(Exception):
                self._stdin.abort()
