"""Dispatch requests served straight from the HTTP protocol, with no ASGI application between.

A dispatch request is the daemon's hot path and most of its cost is fixed per
invocation. Served as ASGI, one invocation paid for the scope and its message dicts,
uvicorn's request cycle and header checks, the middleware stack, Starlette's request
object, a watcher for the client leaving and three socket writes (head, events, end of
body). Measured on a 1-event invocation, that was more CPU than everything the relay
itself does. Here the protocol hands a dispatch request to :class:`DirectDispatch`,
which runs the same checks and the same :class:`~daemon.invocation.Invocation`, and
:class:`DirectStream` writes the response to the transport itself:

* everything written in one turn of the event loop leaves in one write: the head with
  the first events (if they come within :data:`HEAD_DELAY`), the last events with the
  end of the body (one write for a short invocation);
* a client that leaves is noticed when its connection is lost, without a watcher task;
* a client that stops reading is timed only while the transport's buffer is full.

:class:`DirectCycle` has the attributes uvicorn's protocol reads from a request cycle
(``body``, ``more_body``, ``message_event``, ``disconnected``, ``keep_alive``,
``response_complete``, ``run_asgi``), so keep-alive, pipelining, flow control, the
concurrency limit and graceful shutdown stay uvicorn's. Everything else (other routes,
HTTP/1.0, ``Expect: 100-continue``, kinds answered as one JSON body) goes to the ASGI
application as before, and ``SERVER_DIRECT_DISPATCH=false`` sends dispatch there too:
``tests/test_direct.py`` checks both paths give the same answers, byte for byte.
"""

from __future__ import annotations

import asyncio
import logging
import urllib.parse
from collections.abc import Awaitable, Callable, Mapping
from typing import TYPE_CHECKING, Any

import httptools
from starlette.requests import ClientDisconnect
from starlette.responses import JSONResponse
from uvicorn.protocols.http.httptools_impl import STATUS_LINE

from daemon import limits
from daemon.deadlines import Deadline
from daemon.dispatch import KINDS, BadRequest, Kind
from daemon.sse import HEADERS as EVENT_STREAM_HEADERS
from daemon.sse import ClientGone, SendBody

if TYPE_CHECKING:
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

    from daemon.app import Daemon
    from daemon.tracing import RequestSpan, ServerSpans

log = logging.getLogger(__name__)

PREFIX = "/plugin/"
END_OF_BODY = b"0\r\n\r\n"
HEAD_DELAY = 0.05  # seconds the response head may wait to leave with the first events
CONNECTION_CLOSE = (b"connection", b"close")


class RawHeaders:
    """A request's headers as Starlette's ``request.headers`` reads them (``get`` by lower-case
    name, the first of repeated ones, latin-1), decoding only the few that are read."""

    __slots__ = ("_raw",)

    def __init__(self, pairs: list[tuple[bytes, bytes]]) -> None:
        self._raw = dict(reversed(pairs))  # names are lower-case already (the protocol's doing)

    def get(self, name: str, default: str | None = None) -> str | None:
        value = self._raw.get(name.encode("latin-1"))
        return default if value is None else value.decode("latin-1")


class DirectRequest:
    """What :func:`daemon.dispatch.prepare` reads of a request: headers, path parameters, body."""

    __slots__ = ("_cycle", "headers", "path_params")

    def __init__(self, cycle: DirectCycle, headers: RawHeaders, tenant: str) -> None:
        self._cycle = cycle
        self.headers = headers
        self.path_params = {"tenant_id": tenant}

    async def body_within(self, limit: int) -> bytes:
        """The whole body; 413 past ``limit`` bytes, :class:`ClientDisconnect` if the client
        leaves first. Usually there already: it came in the read that completed the head."""
        cycle = self._cycle
        chunks: list[bytes] = []
        size = 0
        while True:
            if cycle.body:
                chunk, cycle.body = bytes(cycle.body), bytearray()
                size += len(chunk)
                if size > limit:
                    raise BadRequest(413, f"request body larger than {limit} bytes")
                chunks.append(chunk)
                continue
            if not cycle.more_body:
                return chunks[0] if len(chunks) == 1 else b"".join(chunks)
            if cycle.disconnected:
                raise ClientDisconnect
            cycle.flow.resume_reading()
            await cycle.message_event.wait()


class _Signal:
    """The cycle's ``message_event``: set by the protocol on body bytes, end of body and a lost
    connection; one waiter at a time (the request's own task)."""

    __slots__ = ("_cycle", "_waiter")

    def __init__(self, cycle: DirectCycle) -> None:
        self._cycle = cycle
        self._waiter: asyncio.Future[None] | None = None

    def set(self) -> None:
        waiter, self._waiter = self._waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_result(None)
        cycle = self._cycle
        if cycle.disconnected and cycle.on_lost is not None:
            cycle.on_lost()

    async def wait(self) -> None:
        self._waiter = asyncio.get_running_loop().create_future()
        await self._waiter


class DirectCycle:
    """One dispatch request on a connection, shaped as uvicorn's request cycle."""

    def __init__(
        self,
        protocol: HttpToolsProtocol,
        kind: Kind,
        path: str,
        tenant: str,
        keep_alive: bool,
    ) -> None:
        self.protocol = protocol
        self.transport: asyncio.Transport = protocol.transport
        self.flow = protocol.flow
        self.kind = kind
        self.path = path
        self.body = bytearray()
        self.more_body = True
        self.disconnected = False
        self.keep_alive = keep_alive
        self.response_started = False
        self.response_complete = False
        self.message_event = _Signal(self)
        self.on_lost: Callable[[], None] | None = None  # the running stream's, while it runs
        self.request = DirectRequest(self, RawHeaders(protocol.headers), tenant)
        self._on_response = protocol.on_response_complete
        # The connection's, reused by each request in turn (see daemon/deadlines.py).
        self.head_deadline: Deadline = protocol.head_deadline
        self.invocation_deadline: Deadline = protocol.invocation_deadline

    async def run_asgi(self, handler: Callable[[DirectCycle], Awaitable[None]]) -> None:
        """What uvicorn runs as the request's task: the handler, and a 500 if it fails."""
        try:
            await handler(self)
        except Exception:
            log.exception("unhandled error in POST %s", self.path)
            if not self.response_started and not self.disconnected:
                error = BadRequest(500, "internal server error")
                self.answer_json(500, error.body())
            else:
                self.transport.abort()

    def head(self, status: int, headers: list[tuple[bytes, bytes]], *, chunked: bool = False) -> bytes:
        """A response head as uvicorn writes it: its default headers (server, date) first."""
        self.response_started = True
        defaults = self.protocol.server_state.default_headers
        if status == 200 and headers is EVENT_STREAM_HEADERS:
            # The event-stream head changes only with the date (uvicorn makes a new list then).
            key = (self.keep_alive, chunked)
            cached = _event_stream_heads.get(key)
            if cached is not None and cached[0] is defaults:
                return cached[1]
            head = _head(status, defaults, headers, self.keep_alive, chunked)
            _event_stream_heads[key] = (defaults, head)
            return head
        return _head(status, defaults, headers, self.keep_alive, chunked)

    def answer_json(self, status: int, content: Any) -> None:
        """A whole JSON response, as Starlette's ``JSONResponse`` renders it."""
        response = JSONResponse(content, status_code=status)
        self.transport.write(self.head(status, response.raw_headers) + response.body)
        self.complete()

    def refuse_body(self, limit: int) -> None:
        """413 for a body over ``limit``, as :class:`daemon.limits.BodyLimit` answers it (a declared
        one before any other check), closing the connection: the rest of the body is not read."""
        self.keep_alive = False
        body = limits.json_error(413, f"request body larger than {limit} bytes")
        head = self.head(413, [(b"content-type", b"application/json"), CONNECTION_CLOSE], chunked=True)
        self.transport.write(b"%s%x\r\n%s\r\n%s" % (head, len(body), body, END_OF_BODY))
        self.complete()

    def complete(self) -> None:
        """The response is written: the connection goes on to its next request, or closes."""
        self.response_complete = True
        if not self.keep_alive:
            self.transport.close()
        on_response, self._on_response = self._on_response, _nothing
        on_response()


_event_stream_heads: dict[tuple[bool, bool], tuple[list[tuple[bytes, bytes]], bytes]] = {}


def _head(
    status: int,
    defaults: list[tuple[bytes, bytes]],
    headers: list[tuple[bytes, bytes]],
    keep_alive: bool,
    chunked: bool,
) -> bytes:
    lines = [STATUS_LINE[status]]  # uvicorn's own, so both paths say the same
    for name, value in (*defaults, *headers):
        lines.append(b"%s: %s\r\n" % (name, value))
    if not keep_alive and CONNECTION_CLOSE not in headers:
        lines.append(b"connection: close\r\n")
    if chunked:
        lines.append(b"transfer-encoding: chunked\r\n")
    lines.append(b"\r\n")
    return b"".join(lines)


def _nothing() -> None:
    pass


class DirectStream:
    """An event-stream response written to the transport; the direct twin of
    :class:`daemon.sse.EventStreamResponse`, with the same contract: runs
    ``produce(send_body)``, calls ``on_disconnect`` if the client leaves first and
    ``on_stall`` if it reads nothing for ``write_timeout`` seconds while the
    transport's buffer is full."""

    def __init__(
        self,
        cycle: DirectCycle,
        produce: Callable[[SendBody], Awaitable[None]],
        on_disconnect: Callable[[], None],
        *,
        write_timeout: float | None = None,
        on_stall: Callable[[], None] | None = None,
        span: RequestSpan | None = None,
    ) -> None:
        self.cycle = cycle
        self._produce = produce
        self._on_disconnect = on_disconnect
        self._write_timeout = write_timeout
        self._on_stall = on_stall or on_disconnect
        self._span = span
        self._pending: list[bytes] = []
        self._scheduled = False
        self.gone = False
        self._ended = False
        self._written = False  # any byte of the response handed to the transport

    async def run(self) -> None:
        cycle = self.cycle
        self._pending.append(cycle.head(200, EVENT_STREAM_HEADERS, chunked=True))
        # The head waits for the first events (one write for both), but not long: a caller
        # waiting for headers learns at once that its request was accepted.
        head_timer = cycle.head_deadline
        head_timer.set(HEAD_DELAY, self._flush)
        if self._span is not None:
            self._span.status = 200
        cycle.on_lost = self._lost
        if cycle.disconnected:  # left while the session was being opened
            self._lost()
        # Reading pauses while requests are pipelined behind this one, and a client that leaves
        # is seen by reading its end of file: read on, as uvicorn's watcher of a response does.
        cycle.flow.resume_reading()
        try:
            await self._produce(self.send_body)
        except ClientGone:
            if not self.gone:
                self.gone = True
                self._on_disconnect()
        except Exception:
            if not self._written:  # nothing has left: the cycle answers 500 instead of a cut stream
                self._pending.clear()
                cycle.response_started = False
                if self._span is not None:
                    self._span.status = 500
            raise
        finally:
            self._ended = True
            head_timer.clear()
            cycle.on_lost = None
        if self.gone:
            return
        self._pending.append(END_OF_BODY)
        self._flush()
        # The end is written; a client that does not read it holds nothing past the timeout.
        try:
            await self._writable()
        except ClientGone:
            return
        if not self.gone:
            cycle.complete()

    async def send_body(self, body: bytes) -> None:
        if self.gone:
            raise ClientGone
        if self._span is not None:
            self._span.watch(body)
        self._pending += (b"%x\r\n" % len(body), body, b"\r\n")
        if self.cycle.flow.write_paused:
            self._flush()
            await self._writable()
        elif not self._scheduled:
            # Everything sent in this turn of the loop (often the whole response) in one write.
            self._scheduled = True
            asyncio.get_running_loop().call_soon(self._flush)

    def _flush(self) -> None:
        self._scheduled = False
        if self._pending and not self.gone:
            self.cycle.transport.write(b"".join(self._pending))
            self._pending.clear()
            self._written = True

    async def _writable(self) -> None:
        flow = self.cycle.flow
        if flow.write_paused:
            try:
                async with asyncio.timeout(self._write_timeout):
                    await flow.drain()
            except TimeoutError:
                self._stalled()
        if self.gone:
            raise ClientGone

    def _stalled(self) -> None:
        if self.gone:
            return
        self.gone = True
        if not self._ended:
            self._on_stall()
        self.cycle.transport.abort()  # close() would wait for a buffer the client never reads

    def _lost(self) -> None:
        if self.gone or self._ended:
            return
        self.gone = True
        self._on_disconnect()


Routes = Mapping[str, Kind]


def direct_routes() -> dict[str, Kind]:
    """Path below ``/plugin/{tenant_id}/`` -> its kind, for every kind answered as a stream."""
    return {kind.path.removeprefix("/plugin/{tenant_id}/"): kind for kind in KINDS if kind.framing != "json"}


def take(protocol: HttpToolsProtocol, routes: Routes) -> DirectCycle | None:
    """The request whose head ``protocol`` just parsed, as a direct cycle if it is one to take.

    Called from ``on_headers_complete``; None leaves the request to the ASGI application.
    """
    parser = protocol.parser
    if parser.get_method() != b"POST" or parser.get_http_version() != "1.1" or protocol.expect_100_continue:
        return None
    path = httptools.parse_url(protocol.url).path.decode("ascii")
    if not path.startswith(PREFIX):
        return None
    if "%" in path:
        path = urllib.parse.unquote(path)
    parts = path.split("/", 3)
    if len(parts) != 4 or not parts[2]:
        return None
    kind = routes.get(parts[3])
    if kind is None or parser.should_upgrade():
        return None
    return DirectCycle(protocol, kind, path, parts[2], parser.should_keep_alive())


class DirectDispatch:
    """Runs a direct cycle: the daemon's checks, then the relayed session or the refusal."""

    def __init__(self, daemon: Daemon, spans: ServerSpans | None) -> None:
        self.daemon = daemon
        self.spans = spans

    async def __call__(self, cycle: DirectCycle) -> None:
        declared = cycle.request.headers.get("content-length")
        limit = self.daemon.settings.max_request_body_bytes
        if declared is not None and not limits.declared_within(declared, limit):
            cycle.refuse_body(limit)  # before tracing, as the body limit is outside it in the app
            return
        span = None
        if self.spans is not None:
            span = self.spans.begin("POST", cycle.path, cycle.protocol.headers)
        failed: BaseException | None = None
        try:
            await self._serve(cycle, span)
        except BaseException as exc:
            failed = exc
            raise
        finally:
            if span is not None:
                span.end(cycle.kind.path, cycle.request.path_params["tenant_id"], failed)

    async def _serve(self, cycle: DirectCycle, span: RequestSpan | None) -> None:
        daemon = self.daemon
        try:
            invocation = await daemon.start_dispatch(cycle.kind, cycle.request)  # type: ignore[arg-type]
        except BadRequest as exc:
            if span is not None:
                span.status = exc.status
            if cycle.disconnected:
                return
            if exc.status == 413:  # a body without a declared length, counted past the limit
                cycle.refuse_body(daemon.settings.max_request_body_bytes)
            else:
                cycle.answer_json(exc.status, exc.body())
            return
        stream = DirectStream(
            cycle,
            invocation.relay,
            invocation.client_gone,
            write_timeout=invocation.write_timeout,
            on_stall=invocation.client_stalled,
            span=span,
        )
        invocation.deadline = cycle.invocation_deadline
        session = invocation.session
        daemon.drain.add(session)
        try:
            await stream.run()
        finally:
            daemon.drain.discard(session)


def protocol(base: type[HttpToolsProtocol], dispatch: DirectDispatch) -> type[HttpToolsProtocol]:
    """``base`` (the daemon's bounded httptools protocol), serving dispatch requests directly."""
    routes = direct_routes()

    class DirectProtocol(base):  # type: ignore[valid-type, misc]
        def connection_made(self, transport: asyncio.Transport) -> None:
            super().connection_made(transport)
            self.head_deadline = Deadline(self.loop)
            self.invocation_deadline = Deadline(self.loop)

        def connection_lost(self, exc: Exception | None) -> None:
            # A request still running keeps its deadlines until it clears them.
            self.head_deadline.close()
            self.invocation_deadline.close()
            super().connection_lost(exc)

        def start_request(self) -> None:
            cycle = take(self, routes)
            if cycle is None:
                super().start_request()  # ASGI
                return
            existing, self.cycle = self.cycle, cycle
            if existing is None or existing.response_complete:
                self._start_asgi_task(cycle, dispatch)
            else:  # pipelined: after the response in progress, as uvicorn queues them
                self.flow.pause_reading()
                self.pipeline.appendleft((cycle, dispatch))

    return DirectProtocol
