"""The public ``/e/{hook_id}/{path}`` route: an HTTP request in, the plugin's HTTP response out.

No server key: the hook id in the URL is the credential, as upstream. The endpoint is looked
up by its hook id alone; everything after that is its own tenant's: the plugin as that tenant
has it (``Runtime.pool_for``), the settings kept for it. The request, read whole within
``MAX_REQUEST_BODY_BYTES``, goes to the plugin as raw HTTP (:mod:`daemon.endpoints.rawhttp`)
in an ``endpoint``/``invoke_endpoint`` request; the SDK answers with a stream of
``{"status", "headers", "result"}`` messages, ``result`` being body bytes in hex
(``invoke_endpoint`` in ``dify_plugin``'s executor, ``EndpointResponseChunk`` upstream).

The status and headers go out with the first body bytes (or at the end, for an empty body),
and every chunk after is sent as it arrives. A response the plugin finished before the head
went out gets a ``Content-Length``; others are chunked. Hop-by-hop headers and any the
plugin could use to break the framing are dropped. The session is an ordinary one: the
same buffer bounds, client write timeout, execution timeout and shutdown drain as dispatch,
with its metrics and span. Before the head is sent, a failure is a JSON error in upstream's
envelope with a 4xx/5xx status; after it, the status is gone, so the error's message ends the
body, as upstream writes it there.
"""

from __future__ import annotations

import binascii
import logging
import re
import time
from typing import Any

from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from daemon import management, spans
from daemon.endpoints import rawhttp
from daemon.endpoints.store import HOOK_ALPHABET, HOOK_LENGTH, Endpoints
from daemon.errors import (
    BAD_REQUEST,
    INTERNAL_ERROR,
    NOT_FOUND,
    PLUGIN_NOT_FOUND,
    SHUTDOWN,
    TIMEOUT,
    SessionError,
    envelope,
    stream_error,
)
from daemon.invocation import SESSION_KEY_NAMES, Invocation, new_session
from daemon.runtime import PluginUnavailable
from daemon.state import DatabaseError
from daemon.wire import tool_request

log = logging.getLogger(__name__)

HOOK_ID = re.compile(f"^[{HOOK_ALPHABET}]{{{HOOK_LENGTH}}}$")
METHODS = ["GET", "POST", "PUT", "DELETE", "OPTIONS"]  # upstream's, HEAD with GET
RESPONSE_ERROR = "EndpointResponseError"  # the plugin's answer is not an HTTP response
HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"transfer-encoding",
        b"te",
        b"trailer",
        b"upgrade",
        b"content-length",
    }
)
_TOKEN = re.compile(rb"^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$")
_BAD_VALUE = re.compile(rb"[\x00\r\n]")


def _json(status: int, code: int, error_type: str, message: str) -> JSONResponse:
    return JSONResponse(envelope(code, error_type, message), status_code=status)


async def _read_body(request: Request, limit: int) -> bytes:
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():  # BodyLimit has refused a declared length over the limit
        size += len(chunk)
        if size > limit:
            raise ValueError(f"request body larger than {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


async def invoke(request: Request) -> Response | ASGIApp:
    daemon = request.app.state.daemon
    settings = daemon.settings
    if daemon.drain.draining:
        return _json(503, -500, INTERNAL_ERROR, "the daemon is shutting down")
    hook_id = request.path_params["hook_id"]
    # Upstream answers an unknown hook with its bad-request type under a 404.
    try:
        endpoint = await Endpoints(daemon.database).by_hook(hook_id) if HOOK_ID.match(hook_id) else None
    except DatabaseError as exc:
        log.error("endpoint lookup failed: %s", exc)
        return _json(500, -500, INTERNAL_ERROR, "internal server error")
    if endpoint is None:
        return _json(404, -400, BAD_REQUEST, "endpoint not found")
    if not endpoint.enabled:
        return _json(404, -404, NOT_FOUND, "endpoint not found")
    pool = daemon.runtime.pool_for(endpoint.plugin_id, endpoint.tenant_id)
    if pool is None:  # installed through another daemon on the same database, perhaps
        try:
            pool = await daemon.runtime.resolve(endpoint.plugin_id, endpoint.tenant_id)
        except PluginUnavailable as exc:
            return _json(503, -500, INTERNAL_ERROR, f"plugin runtime not found: {exc}")
    if pool is None:
        return _json(404, -400, BAD_REQUEST, "plugin installation not found")
    installed = next(
        (
            p
            for p in management.installed(daemon.runtime, endpoint.tenant_id)
            if p.plugin_id == endpoint.plugin_id
        ),
        None,
    )
    if installed is None or not installed.declaration.get("endpoint"):
        return _json(404, -404, PLUGIN_NOT_FOUND, "plugin not found")
    try:
        body = await _read_body(request, settings.max_request_body_bytes)
    except ValueError as exc:
        return _json(413, -413, BAD_REQUEST, str(exc))
    except ClientDisconnect:
        return _json(400, -400, BAD_REQUEST, "the client disconnected before sending the whole body")
    raw = rawhttp.serialize(
        method=request.method,
        path="/" + request.path_params.get("path", ""),
        raw_query=request.scope.get("query_string", b""),
        headers=request.scope["headers"],
        body=body,
        hook_id=hook_id,
        scheme=request.url.scheme,
    )
    try:
        instance = await pool.acquire(settings.plugin_ready_timeout)
    except PluginUnavailable as exc:
        return _json(503, -500, INTERNAL_ERROR, f"plugin runtime not found: {exc}")
    session = new_session(
        instance, None, settings=settings, tenant_id=endpoint.tenant_id, budget=daemon.buffers
    )
    message = tool_request(
        session.id,
        user_id="",
        access_type="endpoint",
        action="invoke_endpoint",
        data={"raw_http_request": raw.hex(), "settings": dict(endpoint.settings)},
        endpoint_id=endpoint.id,
    )
    relay = daemon.invocation(EndpointInvocation, instance, message, session)
    return daemon.drain.guard(session, relay.http_response())


# An endpoint's session span names no provider (its hook id stays out) but the endpoint's id.
_PROVIDER = SESSION_KEY_NAMES.index("plugin.provider")
_SPAN_KEYS = spans.key_set(
    (*SESSION_KEY_NAMES[:_PROVIDER], "endpoint.id", *SESSION_KEY_NAMES[_PROVIDER + 1 :])
)


class EndpointInvocation(Invocation):
    """An ``invoke_endpoint`` session relayed as the plugin's own HTTP response."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.status = 200
        self.headers: list[tuple[bytes, bytes]] = []
        self.head: Message | None = None  # decided: sent with the next body message
        self.head_sent = False

    span_keys = _SPAN_KEYS

    def _span_attributes(self, outcome: str, started: float) -> tuple[Any, ...]:
        values = super()._span_attributes(outcome, started)
        return (*values[:_PROVIDER], str(self.request["endpoint_id"]), *values[_PROVIDER + 1 :])

    def http_response(self) -> ASGIApp:
        """The session's stream response, its head replaced by the plugin's status and headers."""
        stream = self.response()

        async def app(scope: Scope, receive: Receive, send: Send) -> None:
            async def send_with_head(message: Message) -> None:
                if message["type"] == "http.response.start":
                    return  # the event stream's own head: ours goes with the first body bytes
                if not self.head_sent:
                    self.head_sent = True
                    await send(self.head or self._head(0))  # the plugin ended without a body
                await send(message)

            await stream(scope, receive, send_with_head)

        return app

    def _head(self, length: int | None) -> Message:
        headers = list(self.headers)
        if length is not None:
            headers.append((b"content-length", b"%d" % length))
        return {"type": "http.response.start", "status": self.status, "headers": headers}

    def _take(self, message: Any) -> bytes | None:
        """Apply one ``EndpointResponseChunk``; its body bytes, or None if it carries none."""
        if not isinstance(message, dict):
            raise SessionError(
                RESPONSE_ERROR, f"the endpoint answered {type(message).__name__}, not an object"
            )
        status = message.get("status")
        if status is not None:
            if not isinstance(status, int) or isinstance(status, bool) or not 100 <= status <= 599:
                raise SessionError(RESPONSE_ERROR, f"the endpoint answered an invalid status {status!r}")
            self.status = status
        headers = message.get("headers")
        if isinstance(headers, dict):
            for name, value in headers.items():
                self._header(str(name).encode("latin-1", "replace"), str(value).encode())
        result = message.get("result")
        if result is None:
            return None
        try:
            return binascii.unhexlify(result)
        except (binascii.Error, TypeError, ValueError):
            raise SessionError(RESPONSE_ERROR, "the endpoint answered a body chunk that is not hex") from None

    def _header(self, name: bytes, value: bytes) -> None:
        lowered = name.lower()
        if lowered in HOP_BY_HOP or not _TOKEN.match(name) or _BAD_VALUE.search(value):
            log.debug("endpoint session %s: header %r dropped", self.session.id, name[:100])
            return
        self.headers.append((lowered, value))

    async def _forward(self, batch: list[Any], send_body: Any) -> None:
        chunks = [chunk for chunk in map(self._take, batch) if chunk is not None]
        self.messages_out += len(batch)
        if not chunks and self.head is None:
            return  # status and headers only, so far
        body = b"".join(chunks)
        if self.head is None:
            stream = self.session.stream
            finished = stream.closed and stream.error is None and stream.buffered_bytes == 0
            self.head = self._head(len(body) if finished else None)
            self.first_event_at = time.perf_counter()
        self.bytes_out += len(body)
        await send_body(body)

    async def _fail(self, error: SessionError, send_body: Any) -> None:
        self.session.close(error)
        await self._answer_failure(error, stream_error(error), send_body)

    async def _fail_timeout(self, message: str, send_body: Any) -> None:
        await self._answer_failure(
            SessionError(TIMEOUT, message), envelope(-500, INTERNAL_ERROR, message), send_body
        )

    async def _answer_failure(self, error: SessionError, body: dict[str, Any], send_body: Any) -> None:
        """A failure before the head: a JSON error response. After it: the message ends the body."""
        log.warning("endpoint session %s ended: %s: %s", self.session.id, error.error_type, error.message)
        if self.head is None:
            payload = self.codec.dumps(body)
            status = 503 if error.error_type == SHUTDOWN else 500
            self.status, self.headers = status, [(b"content-type", b"application/json")]
            self.head = self._head(len(payload))
            await send_body(payload)
        else:
            await send_body(error.message.encode())
