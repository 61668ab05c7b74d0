"""The plugin process runtime: spawn, handshake, read, route, watch, kill, restart.

Lifecycle of one instance (:class:`PluginInstance`), all in this module:

1. **spawn** ``<venv>/bin/python -m <entrypoint>`` in the plugin directory, in its
   own process group, with a minimal environment (``INSTALL_METHOD=local``; never
   the server key) and ``PR_SET_PDEATHSIG`` (via ``setpriv``) so it dies with us.
2. **handshake**: the SDK prints its manifest as bare JSON and log lines; the first
   ``heartbeat`` means ready. No heartbeat within the ready limit: kill.
3. **read**: one long-lived thread per instance reads stdout in large chunks, splits
   lines (bounded length), decodes them and routes ``session`` events by
   ``session_id``. Stream messages are handed over in one batch per chunk read.
4. **health**: any output counts as a sign of life; silence for the liveness limit
   kills the instance. (The SDK spins on stdin EOF instead of exiting, so closing
   stdin is never used to stop it.)
5. **death**: when stdout ends, every session still open on the instance ends at
   once with an error naming the cause, and the pool restarts the slot with
   exponential backoff.

:class:`PluginPool` keeps a plugin's instances (``PLUGIN_INSTANCES``) and routes each
invocation to the least busy ready one.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import logging
import os
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from enum import StrEnum
from pathlib import Path
from typing import Any

from opentelemetry import trace
from opentelemetry.trace import Status, StatusCode

from daemon import codec as wire
from daemon import metrics
from daemon.codec import Codec
from daemon.config import Settings
from daemon.errors import INSTANCE_DIED, SHUTDOWN, SessionError
from daemon.install import InstallError, ensure_venv
from daemon.manifest import PluginSpec
from daemon.resources.monitor import InstanceResources, limit_for
from daemon.session import Session
from daemon.storage import BackwardsError, BackwardsServices

log = logging.getLogger(__name__)
_tracer = trace.get_tracer(__name__)
_DECODE_SECONDS = metrics.serialization_seconds.labels("decode")

READ_CHUNK = 256 * 1024
_SETPRIV = shutil.which("setpriv")
_PLUGIN_LOG_LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
    "critical": logging.CRITICAL,
}


class InstanceState(StrEnum):
    STARTING = "starting"
    READY = "ready"
    STOPPED = "stopped"


class InstanceStartError(RuntimeError):
    pass


class PluginUnavailable(RuntimeError):
    """No instance can take an invocation (install failed, not ready in time, stopping)."""


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


class PluginInstance:
    def __init__(
        self,
        spec: PluginSpec,
        index: int,
        *,
        python: Path,
        settings: Settings,
        codec: Codec,
        services: BackwardsServices,
        loop: asyncio.AbstractEventLoop,
    ) -> None:
        self.spec = spec
        self.index = index
        self.name = f"{spec.id}#{index}"
        self._python = python
        self._settings = settings
        self._codec = codec
        self._services = services
        self._loop = loop
        self.state = InstanceState.STARTING
        # Written by the loop (open/release), read by the reader thread; single dict
        # operations are atomic, and the reader copies before iterating.
        self.sessions: dict[str, Session] = {}
        self.last_output = time.monotonic()
        self.started_at = time.monotonic()
        self.pid: int | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._stdin: asyncio.WriteTransport | None = None
        self._ready: asyncio.Future[None] = loop.create_future()
        self.exited: asyncio.Future[str] = loop.create_future()
        self._kill_reason: str | None = None
        self._stopping = False
        self._dead = False  # set by the reader thread before it fails the open sessions
        self._death: SessionError | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self.resources = InstanceResources(spec.id, index, spec.memory, settings)

    # -- lifecycle ------------------------------------------------------------

    async def start(self) -> None:
        """Spawn and wait for the first heartbeat; raise :class:`InstanceStartError`."""
        with _tracer.start_as_current_span(
            "plugin.spawn", attributes={"plugin.id": self.spec.id, "plugin.instance": self.index}
        ) as span:
            try:
                await self._start()
            except InstanceStartError as exc:
                span.set_status(Status(StatusCode.ERROR, str(exc)))
                span.set_attribute("plugin.outcome", "failed")
                raise
            finally:
                if self.pid is not None:
                    span.set_attribute("process.pid", self.pid)
            span.set_attribute("plugin.outcome", "ready")

    async def _start(self) -> None:
        cmd = [str(self._python), "-m", self.spec.entrypoint]
        if _SETPRIV:
            cmd = [_SETPRIV, "--pdeathsig", "KILL", "--", *cmd]
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
        self._stdin, _ = await self._loop.connect_write_pipe(asyncio.Protocol, self._proc.stdin)
        threading.Thread(target=self._read_stdout, name=f"reader {self.name}", daemon=True).start()
        threading.Thread(target=self._read_stderr, name=f"stderr {self.name}", daemon=True).start()
        log.info("plugin %s: spawned pid %d", self.name, self.pid)
        done, _ = await asyncio.wait(
            {self._ready, self.exited},
            timeout=self._settings.plugin_ready_timeout,
            return_when=asyncio.FIRST_COMPLETED,
        )
        if self._ready in done and not self.exited.done():
            self.state = InstanceState.READY
            log.info("plugin %s: ready", self.name)
            return
        if not done:
            self.kill(f"sent no heartbeat within {self._settings.plugin_ready_timeout:g} s")
        reason = await self.exited
        raise InstanceStartError(f"plugin {self.name} failed to start: {reason}")

    async def watch(self) -> str:
        """Enforce the liveness limit until the instance exits; return why it did."""
        limit = self._settings.plugin_liveness_timeout
        while not self.exited.done():
            silent = time.monotonic() - self.last_output
            if silent > limit:
                self.kill(f"produced no output for {limit:g} s")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(self.exited), timeout=min(1.0, limit / 4))
        return self.exited.result()

    def kill(self, reason: str) -> None:
        """Kill the process group; the reader thread then sees EOF and reports ``reason``."""
        if self._kill_reason is None:
            self._kill_reason = reason
            level = logging.INFO if self._stopping else logging.WARNING
            log.log(level, "plugin %s: killing: %s", self.name, reason)
        self.state = InstanceState.STOPPED
        self._signal_group()

    def stop(self) -> None:
        self._stopping = True
        self.kill("stopped because the daemon is shutting down")
        for task in self._tasks:
            task.cancel()

    def _signal_group(self) -> None:
        if self._proc is None:
            return
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self._proc.pid, signal.SIGKILL)

    # -- sessions (loop thread) ----------------------------------------------------

    @property
    def ready(self) -> bool:
        return self.state is InstanceState.READY and not self.exited.done()

    def open_session(self, session: Session, request: Mapping[str, Any]) -> None:
        """Register ``session`` and send its request; an instance that died meanwhile fails it."""
        self.sessions[session.id] = session
        self.resources.sessions_started += 1
        # The reader sets _dead before it snapshots the sessions it fails, so a session
        # registered concurrently is failed either there or here, never left hanging.
        if self._dead or not self.ready:
            session.fail(
                self._death
                or SessionError(
                    INSTANCE_DIED, f"plugin instance {self.name} stopped before the invocation started"
                )
            )
            return
        self.send(request)

    def release(self, session: Session) -> None:
        self.sessions.pop(session.id, None)

    def send(self, message: Mapping[str, Any]) -> None:
        if self._stdin is not None and not self._stdin.is_closing():
            self._stdin.write(self._codec.dumps(message) + b"\n")

    # -- the reader thread -----------------------------------------------------------

    def _read_stdout(self) -> None:
        reason = "exited"
        assert self._proc is not None and self._proc.stdout is not None
        fd = self._proc.stdout.fileno()
        limit = self._settings.plugin_max_line_bytes
        pending = b""
        try:
            while True:
                chunk = os.read(fd, READ_CHUNK)
                if not chunk:
                    try:  # EOF usually means exit; give the kernel a moment to finish it
                        self._proc.wait(timeout=1.0)
                    except subprocess.TimeoutExpired:
                        reason = "closed its stdout"
                    break
                self.last_output = time.monotonic()
                data = pending + chunk if pending else chunk
                lines = data.split(b"\n")
                pending = lines.pop()
                if len(pending) > limit or any(len(line) > limit for line in lines):
                    reason = f"wrote a stdout line longer than the {limit} byte limit"
                    log.error("plugin %s %s; failing the instance", self.name, reason)
                    break
                self._handle_lines(lines)
        except Exception as exc:  # a bug here must not leave sessions hanging
            reason = f"reader failed: {exc!r}"
            log.exception("plugin %s: reader failed", self.name)
        finally:
            self._on_reader_exit(reason)

    def _handle_lines(self, lines: list[bytes]) -> None:
        loads = self._codec.loads
        clock = time.perf_counter
        decode_total = 0.0
        pending: dict[str, _Batch] = {}  # stream messages per session, delivered once per chunk

        def flush(session_id: str) -> None:
            batch = pending.pop(session_id, None)
            if batch is not None:
                batch.session.deliver(batch.messages, batch.nbytes)

        for line in lines:
            if not line or line.isspace():
                continue
            started = clock()
            try:
                obj = loads(line)
            except ValueError:
                obj = None
            decoded = clock() - started
            decode_total += decoded
            if not isinstance(obj, dict):
                log.warning("plugin %s printed non-protocol output: %r", self.name, line[:200])
                continue
            event = obj.get("event")
            if event == wire.EVENT_SESSION:
                session_id = obj.get("session_id")
                session = self.sessions.get(session_id) if isinstance(session_id, str) else None
                data = obj.get("data")
                if session is None or not isinstance(data, dict):
                    continue  # a late message for a session that already ended
                session.decode_seconds += decoded
                kind = data.get("type")
                if kind == wire.SESSION_STREAM:
                    batch = pending.get(session_id)
                    if batch is None:
                        batch = pending[session_id] = _Batch(session)
                    batch.messages.append(data.get("data"))
                    batch.nbytes += len(line)
                    continue
                flush(session_id)  # everything before end/error/invoke goes first
                if kind == wire.SESSION_END:
                    session.finish()
                elif kind == wire.SESSION_ERROR:
                    session.fail(SessionError.from_plugin(data.get("data")))
                elif kind == wire.SESSION_INVOKE:
                    self._loop.call_soon_threadsafe(self._start_backwards, session, data.get("data"))
            elif event == wire.EVENT_HEARTBEAT:
                if not self._ready.done():
                    self._loop.call_soon_threadsafe(_resolve, self._ready)
            elif event == wire.EVENT_LOG:
                self._forward_log(obj.get("data"))
            elif event == wire.EVENT_ERROR:
                log.error("plugin %s reported an error: %s", self.name, obj.get("data"))
            # anything else (the SDK's bare manifest line) carries nothing for us
        for session_id in list(pending):
            flush(session_id)
        _DECODE_SECONDS.inc(decode_total)

    def _forward_log(self, data: Any) -> None:
        if isinstance(data, dict):
            level = _PLUGIN_LOG_LEVELS.get(str(data.get("level", "info")).lower(), logging.INFO)
            log.log(level, "plugin %s: %s", self.name, data.get("message"))

    def _read_stderr(self) -> None:
        assert self._proc is not None and self._proc.stderr is not None
        with contextlib.suppress(OSError, ValueError):
            for raw in io.BufferedReader(self._proc.stderr):  # type: ignore[arg-type]
                line = raw.decode(errors="replace").rstrip()
                if line:
                    log.info("plugin %s stderr: %s", self.name, line[:2000])

    def _on_reader_exit(self, reason: str) -> None:
        assert self._proc is not None
        self._signal_group()  # stdout may have closed while the process lives on
        code = self._proc.wait()
        cause = self._kill_reason or self.resources.exit_cause(code) or reason
        outcome = f"{cause} (exit code {code})"
        message = f"plugin instance {self.name} {outcome}"
        self._death = SessionError(SHUTDOWN if self._stopping else INSTANCE_DIED, message)
        self._dead = True  # before the snapshot: open_session() checks it after registering
        for session in list(self.sessions.values()):
            session.fail(self._death)
        log.log(logging.INFO if self._stopping else logging.WARNING, "%s", message)
        with _tracer.start_as_current_span("plugin.exit") as span:
            span.set_attributes(
                {
                    "plugin.id": self.spec.id,
                    "plugin.instance": self.index,
                    "plugin.exit_cause": cause,
                    "plugin.exit_code": code,
                    "plugin.sessions_failed": len(self.sessions),
                }
            )
        self.resources.release()  # after the sessions have their error; before the slot restarts
        with contextlib.suppress(RuntimeError):
            self._loop.call_soon_threadsafe(self._set_exited, outcome)

    def _set_exited(self, message: str) -> None:
        self.state = InstanceState.STOPPED
        if self._stdin is not None:
            self._stdin.abort()
        if not self.exited.done():
            self.exited.set_result(message)

    # -- backwards invocations (loop thread) ---------------------------------------------

    def _start_backwards(self, session: Session, invocation: Any) -> None:
        task = self._loop.create_task(self._answer_backwards(session, invocation))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _answer_backwards(self, session: Session, invocation: Any) -> None:
        if not isinstance(invocation, dict) or not isinstance(invocation.get("backwards_request_id"), str):
            log.warning("plugin %s sent a malformed backwards invocation: %r", self.name, invocation)
            return
        request_id = invocation["backwards_request_id"]
        request = invocation.get("request")
        attributes = {
            "backwards.type": str(invocation.get("type")),
            "backwards.operation": str(request.get("opt")) if isinstance(request, dict) else "",
            "plugin.session_id": session.id,
        }
        with _tracer.start_as_current_span(
            "plugin.backwards", context=session.trace_context, attributes=attributes
        ) as span:
            try:
                result = await self._services.handle(session.tenant_id, session.plugin_id, invocation)
            except BackwardsError as exc:
                span.set_status(Status(StatusCode.ERROR, str(exc)))
                self.send(wire.backwards_response(session.id, request_id, "error", message=str(exc)))
                return
            except Exception as exc:
                log.exception("plugin %s: backwards invocation failed", self.name)
                span.record_exception(exc)
                span.set_status(Status(StatusCode.ERROR, str(exc)))
                message = f"internal error: {exc}"
                self.send(wire.backwards_response(session.id, request_id, "error", message=message))
                return
            self.send(wire.backwards_response(session.id, request_id, "response", data=result))
            self.send(wire.backwards_response(session.id, request_id, "end"))


class _Batch:
    __slots__ = ("messages", "nbytes", "session")

    def __init__(self, session: Session) -> None:
        self.session = session
        self.messages: list[Any] = []
        self.nbytes = 0


def _resolve(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


class PluginPool:
    """A plugin's instances: installs it, keeps ``PLUGIN_INSTANCES`` alive, routes to them."""

    def __init__(
        self,
        spec: PluginSpec,
        *,
        settings: Settings,
        codec: Codec,
        services: BackwardsServices,
        instance_factory: Callable[..., PluginInstance] = PluginInstance,
    ) -> None:
        self.spec = spec
        self._settings = settings
        self._codec = codec
        self._services = services
        self._factory = instance_factory
        self.status = "installing"
        self.error: str | None = None
        self.restarts = 0
        self.instances: list[PluginInstance | None] = [None] * settings.plugin_instances
        self._changed = asyncio.Condition()
        self._stopping = False
        metrics.register_plugin(spec.id)

    async def run(self) -> None:
        """Install, then supervise every instance slot until cancelled."""
        try:
            python = await ensure_venv(self.spec, self._settings.python_interpreter_path)
        except InstallError as exc:
            log.error("plugin %s cannot be installed: %s", self.spec.id, exc)
            await self._set_status("failed", str(exc))
            return
        await self._set_status("starting")
        async with asyncio.TaskGroup() as tasks:
            for slot in range(len(self.instances)):
                tasks.create_task(self._supervise(slot, python))

    async def _supervise(self, slot: int, python: Path) -> None:
        failures = 0
        loop = asyncio.get_running_loop()
        while not self._stopping:
            instance = self._factory(
                self.spec,
                slot,
                python=python,
                settings=self._settings,
                codec=self._codec,
                services=self._services,
                loop=loop,
            )
            self.instances[slot] = instance
            try:
                try:
                    await instance.start()
                except InstanceStartError as exc:
                    log.error("%s", exc)
                    failures += 1
                    await self._set_status(self._aggregate_status(), str(exc))
                else:
                    await self._set_status("ready", None)
                    await instance.watch()
                    healthy_for = time.monotonic() - instance.started_at
                    failures = 1 if healthy_for > 30 else failures + 1
            finally:
                if self._stopping or asyncio.current_task().cancelling():  # type: ignore[union-attr]
                    instance.stop()
            self.instances[slot] = None
            if self._stopping:
                break
            await self._set_status(self._aggregate_status())
            self.restarts += 1
            metrics.instance_restarts.labels(self.spec.id).inc()
            delay = min(self._settings.plugin_restart_backoff_max, 0.25 * 2 ** (failures - 1))
            log.warning("plugin %s: restarting slot %d in %.2f s", self.spec.id, slot, delay)
            await asyncio.sleep(delay)

    def _aggregate_status(self) -> str:
        return "ready" if any(i is not None and i.ready for i in self.instances) else "starting"

    async def _set_status(self, status: str, error: str | None = None) -> None:
        async with self._changed:
            self.status = status
            if error is not None or status == "ready":
                self.error = error
            self._changed.notify_all()

    def ready_instances(self) -> list[PluginInstance]:
        return [i for i in self.instances if i is not None and i.ready]

    async def acquire(self, timeout: float) -> PluginInstance:
        """The least busy ready instance, waiting up to ``timeout`` for one."""

        def available() -> bool:
            return bool(self.ready_instances()) or self.status == "failed" or self._stopping

        async with self._changed:
            try:
                await asyncio.wait_for(self._changed.wait_for(available), timeout)
            except TimeoutError:
                raise PluginUnavailable(
                    f"plugin {self.spec.id} has no ready instance after {timeout:g} s"
                    + (f" (last error: {self.error})" if self.error else "")
                ) from None
        ready = self.ready_instances()
        if not ready:
            raise PluginUnavailable(f"plugin {self.spec.id} is unavailable: {self.error or self.status}")
        return min(ready, key=lambda instance: len(instance.sessions))

    def stop(self) -> None:
        self._stopping = True
        for instance in self.instances:
            if instance is not None:
                instance.stop()

    def describe(self) -> dict[str, Any]:
        return {
            "plugin_id": self.spec.id,
            "version": self.spec.version,
            "status": self.status,
            "error": self.error,
            "restarts": self.restarts,
            "memory_limit": limit_for(self.spec.id, self.spec.memory, self._settings).describe(),
            "instances": [
                {
                    "index": i.index,
                    "pid": i.pid,
                    "state": i.state.value,
                    "sessions": len(i.sessions),
                    **i.resources.describe(),
                }
                for i in self.instances
                if i is not None
            ],
            "providers": {
                name: {
                    "tools": {
                        tool.name: {"output_schema": tool.output_schema is not None}
                        for tool in provider.tools.values()
                    }
                }
                for name, provider in self.spec.providers.items()
            },
        }


class Runtime:
    """Every plugin pool of one daemon process."""

    def __init__(
        self,
        specs: list[PluginSpec],
        *,
        settings: Settings,
        codec: Codec,
        services: BackwardsServices,
        load_errors: Mapping[str, str] | None = None,
    ) -> None:
        self.pools: dict[str, PluginPool] = {}
        self.load_errors = dict(load_errors or {})
        for spec in specs:
            if spec.id in self.pools:
                self.load_errors[str(spec.path)] = f"duplicate plugin id {spec.id}"
                continue
            self.pools[spec.id] = PluginPool(spec, settings=settings, codec=codec, services=services)
        self._tasks: list[asyncio.Task[None]] = []

    def instance_states(self) -> Iterator[tuple[str, int, bool, bool, int]]:
        """(plugin id, slot, up, ready, bytes queued for callers) per slot, for metrics."""
        for plugin_id, pool in self.pools.items():
            for slot, instance in enumerate(pool.instances):
                if instance is None:
                    yield plugin_id, slot, False, False, 0
                    continue
                queued = sum(s.stream.buffered_bytes for s in list(instance.sessions.values()))
                yield plugin_id, slot, not instance.exited.done(), instance.ready, queued

    async def start(self) -> None:
        self._tasks = [
            asyncio.create_task(pool.run(), name=f"pool {plugin_id}")
            for plugin_id, pool in self.pools.items()
        ]

    async def stop(self) -> None:
        for pool in self.pools.values():
            pool.stop()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        # Give reader threads a moment to report the deaths they caused.
        waits = [i.exited for p in self.pools.values() for i in p.instances if i is not None]
        if waits:
            await asyncio.wait(waits, timeout=5)
