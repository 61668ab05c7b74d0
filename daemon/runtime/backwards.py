"""Backwards invocations (plugin -> daemon calls), owned by the session that made them.

Each call runs as a task registered under its session: at most
:data:`PER_SESSION` at once per session and :data:`PER_CONNECTION` per plugin
instance. A plugin that goes over either bound has the offending session ended with
a named error (its later messages are dropped), so a flood costs the daemon a bounded
amount of memory and time. When a session ends, for any reason, its calls still
running are cancelled; nothing outlives its session.

What each invocation type does is :class:`BackwardsServices`' business: only ``storage``
is served (from :class:`daemon.state.PluginStorage`); every other type is refused at once,
so the plugin fails fast instead of waiting out the SDK's 250 s response timeout.
"""

from __future__ import annotations

import asyncio
import binascii
import logging
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from opentelemetry import trace
from opentelemetry.trace import Status, StatusCode

from daemon import wire
from daemon.errors import SessionError
from daemon.runtime.plugin_log import LogBudget
from daemon.session import Session
from daemon.state import MAX_VALUE_BYTES, PluginStorage, StorageFull

log = logging.getLogger("daemon.runtime")
_tracer = trace.get_tracer("daemon.runtime")

PER_SESSION = 16
PER_CONNECTION = 256
LIMIT_ERROR = "PluginBackwardsInvocationLimitError"

Send = Callable[[Mapping[str, Any]], Awaitable[None]]


class BackwardsError(Exception):
    """Answered to the plugin as a backwards ``error`` frame."""


class BackwardsServices:
    def __init__(self, storage: PluginStorage) -> None:
        self.storage = storage

    async def handle(self, tenant: str, plugin: str, invocation: Mapping[str, Any]) -> Any:
        """The ``data`` of the single response frame; raises :class:`BackwardsError`."""
        kind = invocation.get("type")
        if kind != "storage":
            raise BackwardsError(f"backwards invocation type {kind!r} is not supported by this daemon")
        request = invocation.get("request")
        if not isinstance(request, Mapping):
            raise BackwardsError("storage invocation without a request object")
        return await self._storage(tenant, plugin, request)

    async def _storage(self, tenant: str, plugin: str, request: Mapping[str, Any]) -> Any:
        opt, key = request.get("opt"), request.get("key")
        if not isinstance(key, str) or not key or len(key) > 256:
            raise BackwardsError("storage key must be a string of 1 to 256 characters")
        if opt == "set":
            value = request.get("value")
            try:
                raw = binascii.unhexlify(value) if isinstance(value, str) else None
            except (binascii.Error, ValueError):
                raw = None
            if raw is None:
                raise BackwardsError("storage value must be a hex string")
            if len(raw) > MAX_VALUE_BYTES:
                raise BackwardsError(f"storage value larger than {MAX_VALUE_BYTES} bytes")
            try:
                await self.storage.set(tenant, plugin, key, raw)
            except StorageFull as exc:
                raise BackwardsError(str(exc)) from None
            return {"data": "ok"}
        if opt == "get":
            found = await self.storage.get(tenant, plugin, key)
            if found is None:
                raise BackwardsError(f"storage key {key!r} not found")
            return {"data": found.hex()}
        if opt == "exist":
            return {"data": await self.storage.exists(tenant, plugin, key)}
        if opt == "del":
            await self.storage.delete(tenant, plugin, key)
            return {"data": "ok"}
        raise BackwardsError(f"storage operation {opt!r} is not supported")


class BackwardsCalls:
    """The backwards calls in flight on one connection, grouped by session."""

    def __init__(self, name: str, services: BackwardsServices, send: Send) -> None:
        self._name = name
        self._services = services
        self._send = send
        self._by_session: dict[str, set[asyncio.Task[None]]] = {}
        self._count = 0
        self._log_budget = LogBudget(name, "malformed backwards invocations")

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
            shown = repr(invocation)[:200]
            if self._log_budget.allow(len(shown)):
                log.warning("plugin %s sent a malformed backwards invocation: %s", self._name, shown)
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
