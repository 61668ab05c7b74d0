"""The plugin protocol over any transport: readiness, sessions, routing, death.

A :class:`Connection` knows nothing of processes or sockets. Its transport hands it
lines (on the event loop) and, once, the cause of its end (for a process, from the thread
that reaps it). It:

1. waits for readiness: the first ``heartbeat`` (no heartbeat within the ready limit:
   the transport is killed and the start fails);
2. keeps the session registry and routes ``session`` events by ``session_id``, stream
   messages in one batch per chunk read;
3. enforces liveness: any output counts as a sign of life; silence for the liveness limit
   kills the transport;
4. on the transport's end, ends every open session at once with an error naming the
   cause, and cancels their backwards calls.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Mapping
from enum import StrEnum
from typing import Any, Protocol

from opentelemetry import trace
from opentelemetry.trace import Status, StatusCode

from daemon import metrics, wire
from daemon.config import Settings
from daemon.errors import INSTANCE_DIED, SHUTDOWN, SessionError
from daemon.manifest import PluginSpec
from daemon.resources.monitor import InstanceResources
from daemon.runtime.backwards import BackwardsCalls, BackwardsServices
from daemon.runtime.plugin_log import LogBudget
from daemon.session import Session
from daemon.wire import Codec

log = logging.getLogger("daemon.runtime")
_tracer = trace.get_tracer("daemon.runtime")
_DECODE_SECONDS = metrics.serialization_seconds.labels("decode")

_LOGGED_CHARS = 2000  # of one plugin log message, error or stray line (longer ones are cut)
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


class Transport(Protocol):
    """What a connection needs from the thing that carries its lines."""

    name: str
    pid: int | None
    last_output: float
    death_error_type: str  # what the sessions open at its end fail with
    exited: asyncio.Future[str]  # resolves to the cause of the end, once

    async def start(
        self, on_lines: Callable[[list[bytes]], None], on_close: Callable[[str], None]
    ) -> None: ...
    async def send(self, data: bytes) -> None: ...
    def kill(self, reason: str) -> None: ...
    @property
    def kill_reason(self) -> str | None: ...


class Connection:
    """One plugin instance, spoken to over ``transport``."""

    def __init__(
        self,
        spec: PluginSpec,
        index: int,
        transport: Transport,
        *,
        settings: Settings,
        codec: Codec,
        services: BackwardsServices,
        loop: asyncio.AbstractEventLoop,
    ) -> None:
        self.spec = spec
        self.index = index
        self.name = transport.name
        self.transport = transport
        self._settings = settings
        self._codec = codec
        self._loop = loop
        self.state = InstanceState.STARTING
        # Written by the loop (open/release), read by the reader and the end's thread; single dict
        # operations are atomic, and the reader copies before iterating.
        self.sessions: dict[str, Session] = {}
        self.reserved = 0  # acquired for sessions not registered yet (least-busy routing)
        self.started_at = time.monotonic()
        self._ready: asyncio.Future[None] = loop.create_future()
        self._stopping = False
        self._dead = False  # set at the transport's end before it fails the open sessions
        self._death: SessionError | None = None
        self.backwards = BackwardsCalls(self.name, services, self.send)
        # The plugin's log and error events and stray lines, copied into our log at a bounded rate.
        self._log_budget = LogBudget(self.name, "stdout logging")
        # A local process's resource figures and limits (daemon/resources); None over TCP.
        self.resources: InstanceResources | None = getattr(transport, "resources", None)

    @property
    def pid(self) -> int | None:
        return self.transport.pid

    @property
    def exited(self) -> asyncio.Future[str]:
        return self.transport.exited

    @property
    def load(self) -> int:
        return len(self.sessions) + self.reserved

    # -- lifecycle ------------------------------------------------------------

    async def start(self) -> None:
        """Start the transport and wait for the first heartbeat; raise :class:`InstanceStartError`."""
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
        await self.transport.start(self._handle_lines, self._on_close)
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
        """Enforce the liveness limit until the transport ends; return why it did."""
        limit = self._settings.plugin_liveness_timeout
        while not self.exited.done():
            silent = time.monotonic() - self.transport.last_output
            if silent > limit:
                self.kill(f"produced no output for {limit:g} s")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(self.exited), timeout=min(1.0, limit / 4))
        return self.exited.result()

    def kill(self, reason: str) -> None:
        """End the transport; its reader then reports ``reason`` as the cause."""
        if self.transport.kill_reason is None:
            level = logging.INFO if self._stopping else logging.WARNING
            log.log(level, "plugin %s: killing: %s", self.name, reason)
        self.state = InstanceState.STOPPED
        self.transport.kill(reason)

    def stop(self) -> None:
        self._stopping = True
        self.kill("stopped because the daemon is shutting down")
        self.backwards.cancel_all()

    # -- sessions (loop thread) ----------------------------------------------------

    @property
    def ready(self) -> bool:
        return self.state is InstanceState.READY and not self.exited.done()

    async def open_session(self, session: Session, request: Mapping[str, Any]) -> None:
        """Register ``session`` and send its request; an instance that died meanwhile fails it."""
        self.reserved = max(0, self.reserved - 1)
        self.sessions[session.id] = session
        if self.resources is not None:
            self.resources.sessions_started += 1  # lets the idle-CPU watchdog see short sessions
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
        await self.send(request)

    def release(self, session: Session) -> None:
        self.sessions.pop(session.id, None)
        self.backwards.cancel(session.id)

    async def send(self, message: Mapping[str, Any]) -> None:
        """Write one message, waiting while the plugin is not reading."""
        await self.transport.send(self._codec.dumps(message) + b"\n")

    # -- the transport's reader --------------------------------------------------------

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
            except (ValueError, RecursionError):  # the stdlib decoder's depth limit is a RecursionError
                obj = None
            decoded = clock() - started
            decode_total += decoded
            if not isinstance(obj, dict):
                if self._log_budget.allow(min(len(line), 200)):
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
                    self._loop.call_soon_threadsafe(self.backwards.start, session, data.get("data"))
            elif event == wire.EVENT_HEARTBEAT:
                if not self._ready.done():
                    self._loop.call_soon_threadsafe(_resolve, self._ready)
            elif event == wire.EVENT_LOG:
                self._forward_log(obj.get("data"))
            elif event == wire.EVENT_ERROR:
                error = str(obj.get("data"))[:_LOGGED_CHARS]
                if self._log_budget.allow(len(error)):
                    log.error("plugin %s reported an error: %s", self.name, error)
            # anything else (the SDK's bare manifest line) carries nothing for us
        for session_id in list(pending):
            flush(session_id)
        _DECODE_SECONDS.inc(decode_total)

    def _forward_log(self, data: Any) -> None:
        if isinstance(data, dict):
            message = str(data.get("message"))[:_LOGGED_CHARS]
            if self._log_budget.allow(len(message)):
                level = _PLUGIN_LOG_LEVELS.get(str(data.get("level", "info"))[:16].lower(), logging.INFO)
                log.log(level, "plugin %s: %s", self.name, message)

    def _on_close(self, outcome: str) -> None:
        """The transport ended (any thread): every open session ends now, with the cause."""
        message = f"plugin instance {self.name} {outcome}"
        self._death = SessionError(SHUTDOWN if self._stopping else self.transport.death_error_type, message)
        self._dead = True  # before the snapshot: open_session() checks it after registering
        self.state = InstanceState.STOPPED
        failed = list(self.sessions.values())
        for session in failed:
            session.fail(self._death)
        log.log(logging.INFO if self._stopping else logging.WARNING, "%s", message)
        self._log_budget.flush()
        with _tracer.start_as_current_span("plugin.exit") as span:
            span.set_attributes(
                {
                    "plugin.id": self.spec.id,
                    "plugin.instance": self.index,
                    "plugin.exit_cause": outcome,
                    "plugin.sessions_failed": len(failed),
                }
            )
        with contextlib.suppress(RuntimeError):  # the loop is gone at interpreter exit
            self._loop.call_soon_threadsafe(self.backwards.cancel_all)


class _Batch:
    __slots__ = ("messages", "nbytes", "session")

    def __init__(self, session: Session) -> None:
        self.session = session
        self.messages: list[Any] = []
        self.nbytes = 0


def _resolve(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)
