"""A ``text/event-stream`` ASGI response that owns its session's lifetime.

Framing is written directly (``data: <json>\\n\\n``): on the hot path a framing
library costs more per event than the JSON work. All events already queued are
coalesced into one ``send``. A task watches for the client going away, so a
disconnect ends the session at once instead of at the next write.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Awaitable, Callable

import anyio
from starlette.types import Message, Receive, Scope, Send

HEADERS = [
    (b"content-type", b"text/event-stream"),
    (b"cache-control", b"no-cache"),
    (b"x-accel-buffering", b"no"),
]


class ClientGone(Exception):
    pass


SendBody = Callable[[bytes], Awaitable[None]]


class EventStreamResponse:
    """Runs ``produce(send_body)``; calls ``on_disconnect`` if the client leaves first."""

    def __init__(
        self,
        produce: Callable[[SendBody], Awaitable[None]],
        on_disconnect: Callable[[], None],
        *,
        write_timeout: float | None = None,
        on_stall: Callable[[], None] | None = None,
    ) -> None:
        self._produce = produce
        self._on_disconnect = on_disconnect
        # A client that stops reading blocks ``send`` once the socket buffers fill; past
        # ``write_timeout`` it is treated as gone (``on_stall``) and its connection closed.
        self._write_timeout = write_timeout
        self._on_stall = on_stall or on_disconnect

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": HEADERS})
        gone = False
        pending_since: float | None = None  # when the send in progress began
        clock = time.monotonic

        async def send_body(body: bytes) -> None:
            nonlocal pending_since
            if gone:
                raise ClientGone
            pending_since = clock()
            try:
                await send({"type": "http.response.body", "body": body, "more_body": True})
            except OSError:
                raise ClientGone from None
            pending_since = None

        async with anyio.create_task_group() as tasks:

            async def watch_disconnect() -> None:
                nonlocal gone
                while True:
                    message: Message = await receive()
                    if message["type"] == "http.disconnect":
                        gone = True
                        self._on_disconnect()
                        tasks.cancel_scope.cancel()
                        return

            async def watch_stall(limit: float) -> None:
                # One timer per response instead of a deadline around every send.
                nonlocal gone
                while True:
                    started = pending_since
                    waited = 0.0 if started is None else clock() - started
                    if waited >= limit:
                        gone = True
                        self._on_stall()
                        tasks.cancel_scope.cancel()
                        return
                    await anyio.sleep(limit - waited if started is not None else limit / 4)

            tasks.start_soon(watch_disconnect)
            if self._write_timeout is not None:
                tasks.start_soon(watch_stall, self._write_timeout)
            try:
                await self._produce(send_body)
            except ClientGone:
                if not gone:
                    gone = True
                    self._on_disconnect()
            tasks.cancel_scope.cancel()
        if not gone:
            with contextlib.suppress(OSError):
                await send({"type": "http.response.body", "body": b"", "more_body": False})
