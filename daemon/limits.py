"""What a client can hold: bytes of a request head and body, time to send a request, bytes buffered.

uvicorn's httptools protocol buffers a request head of any size and waits for it
forever (its keep-alive timer restarts at every byte, so a client trickling a
header holds its connection, and a descriptor, indefinitely). :func:`protocol`
makes the protocol class the daemon serves with: a head larger than
``SERVER_MAX_HEADER_BYTES`` is answered 431 and the connection closed as soon as
the bytes arrive, a request over ``SERVER_MAX_CONNECTIONS`` is answered 503 in
upstream's error envelope and its connection closed, and a request that is not
fully received within ``SERVER_REQUEST_READ_TIMEOUT`` (an idle new connection
included) is answered 408 and closed. :class:`BodyLimit` applies ``MAX_REQUEST_BODY_BYTES`` to every route's
body, not only dispatch's. :class:`Budget` bounds the bytes buffered for slow
callers across all sessions together.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import threading
from collections.abc import Mapping
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from daemon.deadlines import Deadline
from daemon.errors import BAD_REQUEST, INTERNAL_ERROR, envelope

log = logging.getLogger(__name__)

ABORT = "daemon.abort"  # the ASGI scope's key for cutting the request's connection

_REASONS = {408: b"Request Timeout", 413: b"Content Too Large", 431: b"Request Header Fields Too Large"}


def json_error(status: int, message: str) -> bytes:
    """Upstream's error body, as every other refusal of the daemon has it."""
    server_side = status >= 500
    error_type = INTERNAL_ERROR if server_side else BAD_REQUEST
    return json.dumps(envelope(-500 if server_side else -status, error_type, message)).encode()


def protocol(max_head_bytes: int, read_timeout: float) -> type[HttpToolsProtocol]:
    """The httptools protocol with a bounded request head and a deadline to receive a request."""

    class GuardedProtocol(HttpToolsProtocol):
        _head_bytes = 0  # bytes read while a head is incomplete
        _in_head = True
        _running: Any = None  # the request whose task runs; ``cycle`` is the last one parsed

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            # Set and cleared per request; see daemon/deadlines.py.
            self._deadline = Deadline(self.loop)
            self._keep_alive = Deadline(self.loop)
            self._await_request()

        def connection_lost(self, exc: Exception | None) -> None:
            for deadline in (self._deadline, self._keep_alive):  # nothing left to wait for
                deadline.clear()
                deadline.close()
            running = self._running
            super().connection_lost(exc)
            # uvicorn tells only the last request parsed; one running ahead of pipelined ones
            # would stream on for nobody, its session held, until it ended by itself.
            if running is not None and running is not self.cycle and not running.response_complete:
                running.disconnected = True
                running.message_event.set()

        def _start_asgi_task(self, cycle: Any, app: Any) -> None:
            self._running = cycle
            super()._start_asgi_task(cycle, app)

        def data_received(self, data: bytes) -> None:
            # Counted per read (at most one read beyond the limit is ever held); a read that
            # completes the head may carry body bytes, so the check follows the parse.
            counting = self._in_head
            if counting:
                self._head_bytes += len(data)
            super().data_received(data)
            over = counting and self._in_head and self._head_bytes > max_head_bytes
            if over and not self.transport.is_closing():
                self._refuse(431, f"request head larger than {max_head_bytes} bytes")

        def on_headers_complete(self) -> None:
            self._in_head = False
            headers = self.headers
            size = len(self.url) + sum(map(len, itertools.chain.from_iterable(headers))) + 4 * len(headers)
            if size > max_head_bytes:  # it arrived whole in one read: answered here, not ours
                self._answer_with(_refusal(431, f"request head larger than {max_head_bytes} bytes"))
                return
            limit = self.limit_concurrency
            if limit is not None and (len(self.connections) >= limit or len(self.tasks) >= limit):
                log.warning("over SERVER_MAX_CONNECTIONS (%d): a request answered 503", limit)
                self._answer_with(_refusal(503, f"the daemon serves at most {limit} connections at once"))
                return
            self.start_request()

        def _answer_with(self, refusal: ASGIApp) -> None:
            """Start the request just parsed with ``refusal`` as its application."""
            app, self.app = self.app, refusal
            limit, self.limit_concurrency = self.limit_concurrency, None  # (uvicorn's own 503 is text)
            try:
                super().on_headers_complete()
            finally:
                self.app, self.limit_concurrency = app, limit

        def start_request(self) -> None:
            """A head within bounds: start its request (``daemon/direct.py`` serves some itself)."""
            # An application that must give up on a client (one that stopped reading) cuts the
            # connection with this: a close would wait for the client to read what is buffered.
            self.scope[ABORT] = self.transport.abort
            super().on_headers_complete()

        def on_message_complete(self) -> None:
            if self.cycle is None or not self.cycle.response_complete:
                self._cancel_deadline()
            # else the body trailed an early answer (a refusal): the deadline armed for the
            # next request runs on, or the connection would be held with no timer at all.
            self._in_head, self._head_bytes = True, 0
            super().on_message_complete()

        def on_response_complete(self) -> None:
            """uvicorn's, with the keep-alive wait on the connection's reused deadline."""
            self.server_state.total_requests += 1
            if self.transport.is_closing():
                return
            self._unset_keepalive_if_required()
            self.flow.resume_reading()
            if self.pipeline:
                cycle, app = self.pipeline.pop()
                self._start_asgi_task(cycle, app)
            else:
                self._keep_alive.set(self.timeout_keep_alive, self.timeout_keep_alive_handler)
                self.timeout_keep_alive_task = self._keep_alive  # type: ignore[assignment]  # cancel()led
            self._await_request()

        def _await_request(self) -> None:
            self._deadline.set(read_timeout, self._read_timed_out)

        def _cancel_deadline(self) -> None:
            self._deadline.clear()

        def _read_timed_out(self) -> None:
            if self.transport.is_closing():
                return
            if self.cycle is None or self.cycle.response_complete:
                self._refuse(408, f"the request was not received within {read_timeout:g} s")
            else:  # the body is late: the route reading it sees a disconnect
                self.transport.close()

        def _refuse(self, status: int, message: str) -> None:
            body = json_error(status, message)
            head = (
                b"HTTP/1.1 %d %s\r\ncontent-type: application/json\r\ncontent-length: %d\r\n"
                b"connection: close\r\n\r\n" % (status, _REASONS[status], len(body))
            )
            self.transport.write(head + body)
            self.transport.close()

    return GuardedProtocol


def _refusal(status: int, message: str) -> ASGIApp:
    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        headers = [(b"content-type", b"application/json"), (b"connection", b"close")]
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": json_error(status, message)})

    return app


def declared_within(length: str | bytes, limit: int) -> bool:
    """A ``Content-Length`` that frames a body of at most ``limit`` bytes (anything else is refused)."""
    return length.isdigit() and int(length) <= limit


class BodyTooLarge(Exception):
    pass


class BodyLimit:
    """ASGI middleware: no route reads more than ``limit`` body bytes; the request gets 413."""

    def __init__(self, app: ASGIApp, limit: int, larger: Mapping[str, int] | None = None) -> None:
        self.app = app
        self.limit = limit
        self.larger = dict(larger or {})  # path suffix -> its own limit (package uploads)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.limit
        for suffix, own in self.larger.items():
            if scope["path"].endswith(suffix):
                limit = own
        for name, value in scope["headers"]:
            if name == b"content-length":
                # A declared length frames the body exactly: within the limit, nothing to count.
                if declared_within(value, limit):
                    await self.app(scope, receive, send)
                else:
                    await self._refuse(send, limit)
                return
        received = 0

        async def bounded_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise BodyTooLarge
            return message

        try:
            await self.app(scope, bounded_receive, send)
        except BodyTooLarge:
            with contextlib.suppress(RuntimeError):  # unless the route had begun its answer
                await self._refuse(send, limit)

    async def _refuse(self, send: Send, limit: int) -> None:
        refusal = _refusal(413, f"request body larger than {limit} bytes")
        await refusal({}, _no_receive, send)


async def _no_receive() -> Message:
    raise RuntimeError("a refusal reads nothing")


class Budget:
    """Bytes buffered for callers across every session; shared by their streams, thread-safe."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0
        self._lock = threading.Lock()

    def take(self, nbytes: int) -> bool:
        with self._lock:
            if self.used + nbytes > self.limit:
                return False
            self.used += nbytes
            return True

    def give(self, nbytes: int) -> None:
        if nbytes:
            with self._lock:
                self.used -= nbytes
