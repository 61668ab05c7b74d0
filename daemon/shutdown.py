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
from collections.abc import Iterator

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

    @contextlib.contextmanager
    def track(self, session: Session) -> Iterator[None]:
        self._sessions.add(session)
        self._idle.clear()
        try:
            yield
        finally:
            self._sessions.discard(session)
            if not self._sessions:
                self._idle.set()

    def guard(self, session: Session, response: ASGIApp) -> ASGIApp:
        """``response``, counted as in flight until its body has ended."""

        async def app(scope: Scope, receive: Receive, send: Send) -> None:
            with self.track(session):
                await response(scope, receive, send)

        return app

    async def run(self) -> None:
        """Wait up to the drain period, then end every remaining session and wait for its end."""
        self.draining = True
        if self._sessions:
            log.info("draining %d session(s) for up to %g s", len(self._sessions), self.period)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._idle.wait(), self.period)
        if not self._sessions:
            return
        log.warning("ending %d session(s) still running after the drain period", len(self._sessions))
        error = SessionError(
            SHUTDOWN, f"the daemon is shutting down; the session did not finish within {self.period:g} s"
        )
        for session in list(self._sessions):
            session.fail(error)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._idle.wait(), FINAL_EVENT_GRACE)


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
        await self.drain.run()
        await super().shutdown(sockets)
