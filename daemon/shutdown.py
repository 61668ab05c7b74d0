"""Stopping without cutting a stream: stop accepting, drain, then end what is left by name.

On SIGTERM uvicorn stops accepting and then gives requests its own graceful
timeout before cancelling them, which cuts an event stream mid-body and logs a
traceback per request. :class:`DrainingServer` puts the daemon's own drain in
front of that: the listening sockets close, sessions in flight may finish for
``SERVER_SHUTDOWN_DRAIN_TIMEOUT`` seconds, and every session still running then
ends with ``DaemonShuttingDownError`` as its final event and a complete body.
Only after that does uvicorn's wait begin, and by then nothing is left for it to cut.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import Coroutine, Iterator
from typing import Any

import uvicorn
from starlette.types import ASGIApp, Receive, Scope, Send

from daemon.errors import SHUTDOWN, SessionError
from daemon.session import Session

log = logging.getLogger(__name__)

# After the drain, how long the ended sessions get to deliver their final event. A client
# that does not read is bounded by the stall timeout of the event stream, not by this.
FINAL_EVENT_GRACE = 5.0


class Drain:
    """The sessions in flight, so that a shutdown can wait for them and then end them."""

    def __init__(self, period: float) -> None:
        self.period = period
        self.draining = False
        self._sessions: set[Session] = set()
        self._idle = asyncio.Event()
        self._idle.set()

    @property
    def active(self) -> int:
        return len(self._sessions)

    def add(self, session: Session) -> None:
        """``session`` is in flight until :meth:`discard` (call both on the loop)."""
        self._sessions.add(session)
        if self._idle.is_set():
            self._idle.clear()

    def discard(self, session: Session) -> None:
        self._sessions.discard(session)
        if not self._sessions:
            self._idle.set()

    @contextlib.contextmanager
    def track(self, session: Session) -> Iterator[None]:
        self.add(session)
        try:
            yield
        finally:
            self.discard(session)

    def guard(self, session: Session, response: ASGIApp) -> ASGIApp:
        """``response``, counted as in flight until its body has ended."""

        async def app(scope: Scope, receive: Receive, send: Send) -> None:
            with self.track(session):
                await response(scope, receive, send)

        return app

    async def idle(self, timeout: float) -> bool:
        """Wait until no session is in flight, at most ``timeout``; True if none is."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._idle.wait(), timeout)
        return not self._sessions

    def end_remaining(self) -> None:
        """End every session still in flight with the shutdown error, as its final event."""
        if not self._sessions:
            return
        log.warning("ending %d session(s) still running after the drain period", len(self._sessions))
        error = SessionError(
            SHUTDOWN, f"the daemon is shutting down; the session did not finish within {self.period:g} s"
        )
        for session in list(self._sessions):
            session.fail(error)


class DrainingServer(uvicorn.Server):
    """A uvicorn server whose shutdown drains the daemon's sessions first."""

    def __init__(self, config: uvicorn.Config, drain: Drain) -> None:
        super().__init__(config)
        self.drain = drain

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        for server in self.servers:
            server.close()
        for sock in sockets or []:
            sock.close()
        # Idle keep-alive connections close now; busy ones close after their response.
        for connection in list(self.server_state.connections):
            connection.shutdown()
        drain = self.drain
        drain.draining = True
        if drain.active:
            log.info("draining %d session(s) for up to %g s", drain.active, drain.period)
        # A second Ctrl-C (uvicorn's force_exit) cuts the drain short; the sessions still get
        # their final event, with a second for it to leave.
        await self._unless_forced(drain.idle(drain.period))
        drain.end_remaining()
        if self.force_exit:
            await drain.idle(1.0)
        else:
            await self._unless_forced(drain.idle(FINAL_EVENT_GRACE))
        await super().shutdown(sockets)

    async def _unless_forced(self, waiting: Coroutine[Any, Any, bool]) -> None:
        task = asyncio.ensure_future(waiting)
        while not task.done() and not self.force_exit:
            await asyncio.wait({task}, timeout=0.1)
        task.cancel()
