"""Kinds answered with one JSON body instead of events (``framing="json"`` in the kinds table).

Upstream answers LLM polling (``model/polling/start`` and ``check``) this way: the plugin's last
message as ``{"code": 0, "message": "success", "data": ...}`` with HTTP 200, and a failure as
HTTP 500 with the envelope the stream's final event would have carried
(``internal/service/model_polling.go`` in langgenius/dify-plugin-daemon). The session is relayed
exactly as a stream is (``Invocation.relay``: timeout, instance death, drain, metrics, spans);
only the framing differs, so only the last event is kept.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

import orjson
from starlette.types import Receive, Scope, Send

from daemon.errors import SessionError, stream_error
from daemon.invocation import Invocation

NO_ANSWER = "PluginNoAnswerError"


class OneAnswer:
    """An ASGI response that runs ``invocation`` to its end and sends its last message as JSON."""

    def __init__(self, invocation: Invocation) -> None:
        self.invocation = invocation
        # The last SSE event's JSON: one message, bounded by the plugin's line limit.
        self.last: bytes | None = None

    async def _collect(self, body: bytes) -> None:
        events = [e for e in body.split(b"\n\n") if e.startswith(b"data: ")]
        if events:
            self.last = events[-1][len(b"data: ") :]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        watcher = asyncio.ensure_future(self._watch(receive))
        try:
            await self.invocation.relay(self._collect)
        finally:
            watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watcher
        status, body = self._answer()
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    async def _watch(self, receive: Receive) -> None:
        """A caller that leaves ends the session, as it does for a stream."""
        while (await receive())["type"] != "http.disconnect":
            pass
        self.invocation.client_gone()

    def _answer(self) -> tuple[int, bytes]:
        if self.last is None:
            error = SessionError(NO_ANSWER, "the plugin ended the session without an answer")
            return 500, orjson.dumps(stream_error(error))
        envelope: dict[str, Any] = orjson.loads(self.last)
        return (200 if envelope.get("code") == 0 else 500), self.last
