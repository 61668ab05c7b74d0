"""Backwards invocations (plugin -> daemon calls), owned by the session that made them.

Each call runs as a task registered under its session: at most
:data:`PER_SESSION` at once per session and :data:`PER_CONNECTION` per plugin
instance. A plugin that goes over either bound has the offending session ended with
a named error (its later messages are dropped), so a flood costs the daemon a bounded
amount of memory and time. When a session ends, for any reason, its calls still
running are cancelled; nothing outlives its session. What each invocation type does
is :class:`daemon.storage.BackwardsServices`' business.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from opentelemetry import trace
from opentelemetry.trace import Status, StatusCode

from daemon import codec as wire
from daemon.errors import SessionError
from daemon.session import Session
from daemon.storage import BackwardsError, BackwardsServices

log = logging.getLogger("daemon.runtime")
_tracer = trace.get_tracer("daemon.runtime")

PER_SESSION = 16
PER_CONNECTION = 256
LIMIT_ERROR = "PluginBackwardsInvocationLimitError"

Send = Callable[[Mapping[str, Any]], Awaitable[None]]


class BackwardsCalls:
    """The backwards calls in flight on one connection, grouped by session."""

    def __init__(self, name: str, services: BackwardsServices, send: Send) -> None:
        self._name = name
        self._services = services
        self._send = send
        self._by_session: dict[str, set[asyncio.Task[None]]] = {}
        self._count = 0

    @property
    def active(self) -> int:
        return self._count

    def start(self, session: Session, invocation: Any) -> None:
        """Run one call for ``session`` (loop thread), or end the session if over a bound."""
        if session.closed:
            return
        tasks = self._by_session.setdefault(session.id, set())
        if len(tasks) >= PER_SESSION or self._count >= PER_CONNECTION:
            bound = (
                f"{PER_SESSION} per session"
                if len(tasks) >= PER_SESSION
                else f"{PER_CONNECTION} per instance"
            )
            log.warning(
                "plugin %s: session %s exceeded the backwards call limit (%s)", self._name, session.id, bound
            )
            session.fail(
                SessionError(LIMIT_ERROR, f"the plugin made more than {bound} concurrent backwards calls")
            )
            self.cancel(session.id)
            return
        task = asyncio.get_running_loop().create_task(self._answer(session, invocation))
        tasks.add(task)
        self._count += 1
        task.add_done_callback(lambda t: self._done(session.id, t))

    def _done(self, session_id: str, task: asyncio.Task[None]) -> None:
        self._count -= 1
        tasks = self._by_session.get(session_id)
        if tasks is not None:
            tasks.discard(task)
            if not tasks:
                del self._by_session[session_id]

    def cancel(self, session_id: str) -> None:
        """The session ended: its calls still running end with it."""
        for task in self._by_session.get(session_id, ()):
            task.cancel()

    def cancel_all(self) -> None:
        for tasks in self._by_session.values():
            for task in tasks:
                task.cancel()

    async def _answer(self, session: Session, invocation: Any) -> None:
        if not isinstance(invocation, dict) or not isinstance(invocation.get("backwards_request_id"), str):
            log.warning("plugin %s sent a malformed backwards invocation: %r", self._name, invocation)
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
                await self._send(wire.backwards_response(session.id, request_id, "error", message=str(exc)))
                return
            except Exception as exc:
                log.exception("plugin %s: backwards invocation failed", self._name)
                span.record_exception(exc)
                span.set_status(Status(StatusCode.ERROR, str(exc)))
                message = f"internal error: {exc}"
                await self._send(wire.backwards_response(session.id, request_id, "error", message=message))
                return
            await self._send(wire.backwards_response(session.id, request_id, "response", data=result))
            await self._send(wire.backwards_response(session.id, request_id, "end"))
