"""Relaying one invocation: open a session on an instance, stream it, end it cleanly.

Whatever happens (plugin end or error, instance death, slow client, timeout,
client gone), the session is released from its instance exactly once and the
caller's last event says how it ended.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Mapping
from typing import Any

import anyio

from daemon import codec as wire
from daemon.codec import Codec
from daemon.config import Settings
from daemon.manifest import ToolSpec
from daemon.runtime import PluginInstance
from daemon.session import CLIENT_GONE, TIMEOUT, Session, SessionError
from daemon.sse import EventStreamResponse, SendBody
from daemon.validation import new_variables

log = logging.getLogger(__name__)

FINAL_EVENT_GRACE = 5.0


class Invocation:
    def __init__(
        self,
        instance: PluginInstance,
        request: Mapping[str, Any],
        session: Session,
        *,
        codec: Codec,
        timeout: float,
    ) -> None:
        self.instance = instance
        self.request = request
        self.session = session
        self.codec = codec
        self.timeout = timeout
        self.messages_out = 0
        self.bytes_out = 0
        self.outcome = "pending"

    def response(self) -> EventStreamResponse:
        return EventStreamResponse(self.relay, self.client_gone)

    def client_gone(self) -> None:
        self.outcome = CLIENT_GONE
        self.session.close(SessionError(CLIENT_GONE, "the client disconnected"))

    async def relay(self, send_body: SendBody) -> None:
        session, codec = self.session, self.codec
        try:
            self.instance.open_session(session, self.request)
            with anyio.move_on_after(self.timeout) as deadline:
                try:
                    async for batch in session.batches():
                        body = b"".join([wire.sse_success(codec, message) for message in batch])
                        self.messages_out += len(batch)
                        self.bytes_out += len(body)
                        await send_body(body)
                    self.outcome = "success"
                except SessionError as error:
                    if self.outcome != CLIENT_GONE:
                        self.outcome = error.error_type
                    await send_body(wire.sse_error(codec, error.error_type, error.message, error.details))
            if deadline.cancelled_caught:
                self.outcome = "timeout"
                message = f"the plugin did not finish within {self.timeout:g} s"
                session.close(SessionError(TIMEOUT, message))
                with anyio.move_on_after(FINAL_EVENT_GRACE):
                    await send_body(wire.sse_error(codec, TIMEOUT, message))
        finally:
            log.debug("session %s on %s ended: %s", session.id, self.instance.name, self.outcome)
            self.instance.release(session)
            if not session.closed:
                session.close()


def new_session(
    instance: PluginInstance,
    tool: ToolSpec | None,
    *,
    settings: Settings,
    tenant_id: str,
) -> Session:
    variables = new_variables(settings.validator, tool.output_schema if tool is not None else None)
    return Session(
        uuid.uuid4().hex,
        asyncio.get_running_loop(),
        buffer_bytes=settings.session_buffer_bytes,
        variables=variables,
        tenant_id=tenant_id,
        plugin_id=instance.spec.id,
    )
