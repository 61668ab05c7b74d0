"""One tool invocation in flight: the stream from the reader to the request's task.

The producer side (``deliver``, ``finish``, ``fail``) is called by the instance's stdout
reader, a callback on the event loop; ``close`` may also be called by the HTTP layer (client
gone), by timeouts, and from other threads (an instance's end, which fails its sessions).
The consumer side (``next_batch``) runs in the request's own task and is the only place that
applies output variables.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from opentelemetry.context import Context

from daemon.errors import (
    SLOW_CLIENT,
    VALIDATION_CRASH,
    VALIDATION_ERROR,
    VALIDATION_TIMEOUT,
    VARIABLE_ERROR,
    SessionError,
)
from daemon.limits import Budget
from daemon.stream import Stream, StreamOverflow
from daemon.validation import OutputVariables, ValidationTimeout, VariableMessageError

log = logging.getLogger(__name__)


class Session:
    def __init__(
        self,
        session_id: str,
        loop: asyncio.AbstractEventLoop,
        *,
        buffer_bytes: int,
        variables: OutputVariables | None,
        tenant_id: str,
        plugin_id: str,
        budget: Budget | None = None,
    ) -> None:
        self.id = session_id
        self.tenant_id = tenant_id
        self.plugin_id = plugin_id
        self.variables = variables
        self.stream: Stream[Any] = Stream(loop, buffer_bytes, budget)
        self.trace_context: Context | None = None  # the session span, for work on other threads
        self.decode_seconds = 0.0  # accumulated by the reader
        self.close_failure: BaseException | None = None
        self._overflow_logged = False
        self.bytes_in = 0
        self.first_message_at: float | None = None
        self.started_at = time.perf_counter()

    def attach_trace(self, context: Context) -> None:
        """Parent work done for this session on other threads (validation, backwards calls)."""
        self.trace_context = context
        if self.variables is not None:
            self.variables.trace_context = context

    # -- producer side: the reader, the HTTP layer, timeouts ----------------------

    def deliver(self, messages: list[Any], nbytes: int) -> None:
        if self.first_message_at is None:
            self.first_message_at = time.perf_counter()
        self.bytes_in += nbytes
        if not self.stream.put_many(messages, nbytes) and self.stream.overflowed:
            if not self._overflow_logged:
                self._overflow_logged = True
                log.warning(
                    "session %s (tenant %s, plugin %s): the client fell too far behind (%s); ending it",
                    self.id,
                    self.tenant_id,
                    self.plugin_id,
                    self.stream.error,
                )
            self.close()

    def finish(self) -> None:
        """The plugin sent ``end``."""
        self.close()

    def fail(self, error: SessionError) -> None:
        self.close(error)

    def close(self, error: BaseException | None = None) -> None:
        """Close from any thread. Designs that validate on close do it here."""
        if self.variables is not None and self.variables.validates_on_close:
            try:
                self.variables.on_close()
            except Exception as exc:  # the unsafe design's race surfaces here
                log.error("session %s: output validation crashed: %r", self.id, exc)
                self.close_failure = exc
        self.stream.close(error)

    @property
    def closed(self) -> bool:
        return self.stream.closed

    # -- consumer side: the request's task -----------------------------------------

    async def next_batch(self) -> list[Any]:
        """The next batch of tool messages; ``[]`` at the clean end; raises :class:`SessionError`
        for a failed end. A coroutine, not an async generator: the event loop tracks every async
        generator in a weak set, a cost paid per session."""
        variables = self.variables
        try:
            batch = await self.stream.receive_batch()
        except StreamOverflow as exc:
            raise SessionError(SLOW_CLIENT, str(exc)) from None
        if batch:
            if variables is not None:
                for message in batch:
                    if isinstance(message, dict) and message.get("type") == "variable":
                        try:
                            variables.apply(message.get("message") or {})
                        except VariableMessageError as exc:
                            raise SessionError(VARIABLE_ERROR, str(exc)) from None
            return batch
        if isinstance(self.close_failure, ValidationTimeout):
            raise SessionError(VALIDATION_TIMEOUT, str(self.close_failure))
        if self.close_failure is not None:
            exc = self.close_failure
            raise SessionError(VALIDATION_CRASH, f"output validation crashed: {type(exc).__name__}: {exc}")
        if variables is not None:
            try:
                verdict = variables.on_end_reached()
            except ValidationTimeout as exc:
                raise SessionError(VALIDATION_TIMEOUT, str(exc)) from None
            if verdict is not None:
                raise SessionError(VALIDATION_ERROR, verdict)
        return []
