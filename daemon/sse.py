"""A ``text/event-stream`` ASGI response that owns its session's lifetime.

Framing is written directly (``data: <json>\\n\\n``): on the hot path a framing
library costs more per event than the JSON work. All events already queued are
coalesced into one ``send``. A task watches for the client going away, so a
disconnect ends the session within :data:`WATCH_AFTER` instead of at the next write (or
never: the server drops writes to a closed connection silently). The watcher is started
only once a response has run for :data:`WATCH_AFTER`: most invocations end sooner, and a
task per invocation (its creation, scheduling, registry entry and cancellation) cost more
than the rest of the response's own work.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

from starlette.types import Message, Receive, Scope, Send

from daemon.limits import ABORT

HEADERS = [
    (b"content-type", b"text/event-stream"),
    (b"cache-control", b"no-cache"),
    (b"x-accel-buffering", b"no"),
]


class ClientGone(Exception):
    pass


SendBody = Callable[[bytes], Awaitable[None]]

WATCH_AFTER = 0.05  # seconds a response runs before a task watches for its client leaving


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
        # Plain asyncio, not a task group: one watcher task and one timer per response are a
        # fraction of a task group's cost, which is paid once per invocation. Either ends the
        # response by cancelling this task, which then takes that cancellation back.
        loop = asyncio.get_running_loop()
        task = asyncio.current_task()
        assert task is not None
        gone = False
        stalled = False
        ended = False
        stopping = False  # this response cancelled its own task
        pending_since: float | None = None  # when the send in progress began
        clock = time.monotonic

        def stop(callback: Callable[[], None]) -> None:
            nonlocal gone, stopping
            if gone or ended:
                return
            gone = True
            callback()
            stopping = True
            task.cancel()

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

        async def watch_disconnect() -> None:
            while True:
                message: Message = await receive()
                if message["type"] == "http.disconnect":
                    stop(self._on_disconnect)
                    return

        watcher: asyncio.Task[None] | None = None
        limit = self._write_timeout

        def check() -> None:
            # One timer per response: it starts the watcher (once the response has run for
            # WATCH_AFTER) and then checks the send in progress, instead of a deadline per send.
            nonlocal timer, watcher, stalled
            if ended:
                return
            if watcher is None:
                watcher = loop.create_task(watch_disconnect())
            if limit is None:
                return
            started = pending_since
            waited = 0.0 if started is None else clock() - started
            if waited >= limit:
                stalled = not gone and not ended
                stop(self._on_stall)
                return
            timer = loop.call_later(limit - waited if started is not None else limit / 4, check)

        first = WATCH_AFTER if limit is None else min(WATCH_AFTER, limit / 4)
        timer: asyncio.TimerHandle = loop.call_later(first, check)
        try:
            try:
                await self._produce(send_body)
            except ClientGone:
                if not gone:
                    gone = True
                    self._on_disconnect()
        except asyncio.CancelledError:
            # Ours unless someone else (server shutdown) cancelled this task as well.
            if not stopping or task.uncancel() > 0:
                raise
        finally:
            ended = True
            timer.cancel()
            if watcher is not None:
                watcher.cancel()
        if stalled:
            await _cut(scope)
            return
        if gone:
            return
        try:
            # The end waits for the client to read what is before it: not past the timeout.
            async with asyncio.timeout(limit):
                await send({"type": "http.response.body", "body": b"", "more_body": False})
        except TimeoutError:
            await _cut(scope)
        except OSError:
            pass


async def _cut(scope: Scope) -> None:
    """Cut the connection of a client that stopped reading (a close would wait for it to read)."""
    abort = scope.get(ABORT)
    if abort is not None:
        abort()
        # Its loss is handled before the response returns, so the server counts it as a
        # disconnect, not as an application that forgot to finish its response.
        await asyncio.sleep(0)
