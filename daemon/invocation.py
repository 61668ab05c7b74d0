"""Relaying one invocation: open a session on an instance, stream it, end it cleanly.

Whatever happens (plugin end or error, instance death, slow client, timeout,
client gone), the session is released from its instance exactly once and the
caller's last event says how it ended. The ``plugin.session`` span and the
invocation metrics are recorded here, once per session.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from typing import Any

from opentelemetry.trace import INVALID_SPAN, Span, Status, StatusCode

from daemon import metrics, spans, wire
from daemon.config import Settings
from daemon.deadlines import Deadline
from daemon.errors import CLIENT_GONE, OUTPUT_ENCODING_ERROR, SLOW_CLIENT, TIMEOUT, SessionError
from daemon.limits import Budget
from daemon.manifest import ToolSpec
from daemon.runtime import PluginInstance
from daemon.session import Session
from daemon.sse import EventStreamResponse, SendBody
from daemon.validation import new_variables
from daemon.wire import Codec

log = logging.getLogger(__name__)
_tracer = spans.Tracer(__name__)

FINAL_EVENT_GRACE = 5.0
# The plugin.session span's attributes: who ran it, then what it relayed (LeanSpan.record).
SESSION_KEY_NAMES = (
    "plugin.id",
    "plugin.instance",
    "plugin.operation",
    "plugin.provider",
    "plugin.session_id",
    "tenant.id",
    "validation.design",
    "plugin.tool",
    "plugin.messages_in",
    "plugin.messages_out",
    "plugin.bytes_in",
    "plugin.bytes_out",
    "plugin.decode_seconds",
    "plugin.encode_seconds",
    "plugin.outcome",
    "plugin.time_to_first_message_seconds",
    "plugin.time_to_first_event_seconds",
)
SESSION_KEYS = spans.key_set(SESSION_KEY_NAMES)
_NO_TOOL = object()
_random_bits = random.Random().getrandbits  # seeded from os.urandom once


class Invocation:
    span_keys: int | tuple[str, ...] = SESSION_KEYS  # the session span's, as _span_attributes orders them

    def __init__(
        self,
        instance: PluginInstance,
        request: dict[str, Any],
        session: Session,
        *,
        codec: Codec,
        timeout: float,
        design: str,
        traced: bool = True,
        write_timeout: float | None = None,
    ) -> None:
        self.instance = instance
        self.request = request
        self.session = session
        self.codec = codec
        self.timeout = timeout
        self.design = design
        self.traced = traced  # False when tracing is off: no span is made, not even a no-op one
        self.operation = request["data"]["action"]
        self.messages_out = 0
        self.bytes_out = 0
        self.encode_seconds = 0.0
        self.first_event_at: float | None = None
        self.outcome = "pending"
        self.error = ""  # "<type>: <message>" of a failed session, for its span's status
        self.write_timeout = write_timeout
        # The deadline the timeout is kept on: a connection's reused one (daemon/direct.py),
        # else one of its own.
        self.deadline: Deadline | None = None

    def response(self) -> EventStreamResponse:
        return EventStreamResponse(
            self.relay, self.client_gone, write_timeout=self.write_timeout, on_stall=self.client_stalled
        )

    def client_gone(self) -> None:
        self.outcome = CLIENT_GONE
        self.session.close(SessionError(CLIENT_GONE, "the client disconnected"))

    def client_stalled(self) -> None:
        self.outcome = SLOW_CLIENT
        message = f"the client read nothing for {self.write_timeout:g} s"
        self.session.close(SessionError(SLOW_CLIENT, message))

    async def relay(self, send_body: SendBody) -> None:
        series = metrics.invocation_series(self.instance.spec.id, self.operation)
        if not self.traced:
            await self._relay_and_record(send_body, series, INVALID_SPAN)
            return
        # Not made current: what runs under it (validation, backwards calls) is given its parent.
        # Ended by the ``with``, which records an exception that escapes the relay; its
        # attributes are recorded once, as the session ends (_record).
        with _tracer.start_span("plugin.session") as span:
            self.session.attach_trace(spans.in_context(span))
            # Hand the trace to the plugin, so an instrumented plugin can continue it.
            spans.inject(self.request["context"], span)
            await self._relay_and_record(send_body, series, span)

    def _span_attributes(self, outcome: str, started: float) -> tuple[Any, ...]:
        """The session span's attribute values, in the order of :attr:`span_keys` (None: not had)."""
        data = self.request["data"]
        session = self.session
        tool = data.get("tool", _NO_TOOL)
        first_message, first_event = session.first_message_at, self.first_event_at
        return (
            self.instance.spec.id,
            self.instance.index,
            self.operation,
            str(data.get("provider")),
            session.id,
            session.tenant_id,
            self.design if session.variables is not None else self._unvalidated(),
            None if tool is _NO_TOOL else str(tool),
            session.stream.received_items,
            self.messages_out,
            session.bytes_in,
            self.bytes_out,
            session.decode_seconds,
            self.encode_seconds,
            outcome,
            None if first_message is None else first_message - started,
            None if first_event is None else first_event - started,
        )

    def _unvalidated(self) -> str:
        """Why this session has nothing to validate: the daemon's design, or a tool without schema."""
        return "none" if self.design == "none" else "no schema"

    async def _relay_and_record(
        self, send_body: SendBody, series: metrics.InvocationSeries, span: Span
    ) -> None:
        started = time.perf_counter()
        active = series.active
        active.count += 1
        try:
            await self._relay(send_body, started)
        finally:
            active.count -= 1
            self._record(series, span, started)

    async def _relay(self, send_body: SendBody, started: float) -> None:
        session = self.session
        try:
            # From before the request is sent: a plugin that stops reading its stdin makes the
            # send wait (flow control), and that wait must end at the deadline too.
            deadline = _Deadline(self.timeout, self.deadline)
            try:
                try:
                    await self.instance.open_session(session, self.request)
                    while batch := await session.next_batch():
                        await self._forward(batch, send_body)
                    self.outcome = "success"
                except SessionError as error:
                    if self.outcome != CLIENT_GONE:
                        self.outcome = error.error_type
                        self.error = f"{error.error_type}: {error.message}"
                    await self._fail(error, send_body)
            except asyncio.CancelledError:
                if not deadline.took_cancel():
                    raise
                self.outcome = TIMEOUT
                # Upstream's words ("killed by timeout") first, as its final event says them.
                message = f"killed by timeout: the plugin did not finish within {self.timeout:g} s"
                self.error = f"{TIMEOUT}: {message}"
                session.close(SessionError(TIMEOUT, message))
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(FINAL_EVENT_GRACE):
                        await self._fail_timeout(message, send_body)
            finally:
                deadline.cancel()
        finally:
            log.debug("session %s on %s ended: %s", session.id, self.instance.name, self.outcome)
            self.instance.release(session)
            if not session.closed:
                session.close()
            session.stream.discard()

    # How messages and failures are framed for the client: server-sent events here; a subclass
    # that answers in another form (an endpoint's HTTP response) overrides these three.

    async def _forward(self, batch: list[Any], send_body: SendBody) -> None:
        """One batch of the plugin's messages, as one write of success events."""
        clock = time.perf_counter
        encode_started = clock()
        try:  # free unless it raises
            body = wire.sse_successes(self.codec, batch)
        except (TypeError, ValueError, RecursionError) as exc:  # e.g. nested deeper than orjson writes
            message = f"the plugin sent a message that cannot be encoded again for the client: {exc}"
            raise SessionError(OUTPUT_ENCODING_ERROR, message) from None
        self.encode_seconds += clock() - encode_started
        self.messages_out += len(batch)
        self.bytes_out += len(body)
        if self.first_event_at is None:
            self.first_event_at = clock()
        await send_body(body)

    async def _fail(self, error: SessionError, send_body: SendBody) -> None:
        """The session failed: its final error event."""
        await send_body(wire.sse_error(self.codec, error.error_type, error.message, error.details))

    async def _fail_timeout(self, message: str, send_body: SendBody) -> None:
        """The plugin ran past its deadline: the daemon's own final error event."""
        await send_body(wire.sse_daemon_error(self.codec, message))

    def _record(self, series: metrics.InvocationSeries, span: Span, started: float) -> None:
        """Metrics and span attributes, once per session: never per message."""
        session = self.session
        ended = time.perf_counter()
        outcome = metrics.outcome_label(self.outcome)
        # Exemplars tie a latency bucket to a trace (shown by Grafana, exposed in OpenMetrics).
        exemplar = None
        if span.is_recording():
            if type(span) is spans.LeanSpan:
                exemplar = {"trace_id": span.trace_hex()}  # formatted once, for the traceparent
            else:
                exemplar = {"trace_id": format(span.get_span_context().trace_id, "032x")}
        termination = None
        if self.outcome in (SLOW_CLIENT, TIMEOUT):
            termination = "slow_client" if self.outcome == SLOW_CLIENT else "timeout"
        series.record(
            metrics.SessionRecord(
                outcome,
                ended - started,
                None if self.first_event_at is None else self.first_event_at - started,
                self.messages_out,
                session.bytes_in,
                self.bytes_out,
                session.stream.peak_bytes,
                self.encode_seconds,
                termination,
                exemplar,
            )
        )
        if exemplar is None:  # not recording
            return
        spans.record(span, self.span_keys, self._span_attributes(outcome, started))
        if outcome not in ("success", "client_gone"):
            span.set_status(Status(StatusCode.ERROR, self.error or self.outcome))


class _Deadline:
    """Cancels the current task after ``seconds``: what ``asyncio.timeout`` does, without a
    context manager, on the connection's reused deadline if it has one (paid once per
    invocation). The task's ``CancelledError`` is the deadline's if :meth:`took_cancel` says
    so; any other cancel is left to propagate."""

    __slots__ = ("_cancelling", "_deadline", "_owned", "_task", "expired")

    def __init__(self, seconds: float, deadline: Deadline | None) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._task = task
        self._cancelling = task.cancelling()
        self.expired = False
        self._owned = deadline is None
        self._deadline = Deadline(asyncio.get_running_loop()) if deadline is None else deadline
        self._deadline.set(seconds, self._expire)

    def _expire(self) -> None:
        self.expired = True
        self._task.cancel()

    def took_cancel(self) -> bool:
        """Whether the ``CancelledError`` being handled is the deadline's alone (it is then taken back)."""
        return self.expired and self._task.uncancel() <= self._cancelling

    def cancel(self) -> None:
        self._deadline.clear()
        if self._owned:
            self._deadline.close()


def new_session(
    instance: PluginInstance,
    tool: ToolSpec | None,
    *,
    settings: Settings,
    tenant_id: str,
    budget: Budget | None = None,
) -> Session:
    variables = new_variables(settings.validator, tool.output_schema if tool is not None else None)
    return Session(
        # 128 random bits as uuid4().hex spells them, without its os.urandom system call per session:
        # a session id names a session to its plugin, it is not a secret.
        f"{_random_bits(128):032x}",
        asyncio.get_running_loop(),
        buffer_bytes=settings.session_buffer_bytes,
        variables=variables,
        tenant_id=tenant_id,
        plugin_id=instance.spec.id,
        budget=budget,
    )
