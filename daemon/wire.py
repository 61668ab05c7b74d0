"""Wire types and the JSON codec for the plugin's JSON-lines protocol and the SSE body.

The daemon decodes every plugin line and encodes every SSE event, so the codec is
on the hot path: ``orjson`` by default, the standard library's ``json`` as the
baseline the benchmarks compare against.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import orjson

from daemon.config import CodecName
from daemon.errors import INTERNAL_ERROR, SessionError, envelope, stream_error


@dataclass(frozen=True, slots=True)
class Codec:
    name: str
    loads: Callable[[bytes], Any]
    dumps: Callable[[Any], bytes]


def _stdlib_dumps(obj: Any) -> bytes:
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode()


CODECS: dict[str, Codec] = {
    CodecName.ORJSON: Codec("orjson", orjson.loads, orjson.dumps),
    CodecName.JSON: Codec("json", json.loads, _stdlib_dumps),
}


def get_codec(name: str) -> Codec:
    return CODECS[name]


# Plugin -> daemon: top-level ``event`` values.
EVENT_SESSION = "session"
EVENT_HEARTBEAT = "heartbeat"
EVENT_LOG = "log"
EVENT_ERROR = "error"

# ``data.type`` of a session event.
SESSION_STREAM = "stream"
SESSION_END = "end"
SESSION_ERROR = "error"
SESSION_INVOKE = "invoke"


def tool_request(
    session_id: str,
    *,
    user_id: str,
    action: str,
    access_type: str = "tool",
    data: dict[str, Any],
    conversation_id: str | None = None,
    message_id: str | None = None,
    app_id: str | None = None,
    endpoint_id: str | None = None,
    context: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The envelope the SDK expects on stdin for one invocation of any kind: the SDK routes it
    by ``data.type`` (``access_type``) and ``data.action``."""
    return {
        "session_id": session_id,
        "event": "request",
        "conversation_id": conversation_id,
        "message_id": message_id,
        "app_id": app_id,
        "endpoint_id": endpoint_id,
        "context": context or {},
        "data": {"user_id": user_id, "type": access_type, "action": action, **data},
    }


def backwards_response(
    session_id: str, request_id: str, event: str, *, data: Any = None, message: str = ""
) -> dict[str, Any]:
    """One frame of the answer to a plugin's backwards invocation.

    ``event`` is ``response`` (with ``data``), ``end`` or ``error`` (with ``message``).
    """
    return {
        "session_id": session_id,
        "event": "backwards_response",
        "data": {
            "backwards_request_id": request_id,
            "event": event,
            "message": message,
            "data": data,
        },
    }


# A success event is ``data: {"code":0,"message":"success","data":<message>}`` and a blank line;
# both codecs write compact JSON, so only the message itself needs encoding.
_SUCCESS_HEAD = b'data: {"code":0,"message":"success","data":'
_SUCCESS_TAIL = b"}\n\n"


def sse_success(codec: Codec, message: Any) -> bytes:
    """One SSE event carrying one tool message, framed as upstream does."""
    return b"%s%s%s" % (_SUCCESS_HEAD, codec.dumps(message), _SUCCESS_TAIL)


def sse_successes(codec: Codec, messages: list[Any]) -> bytes:
    """The events of ``messages``, one after another, as one body: one join per batch rather
    than an envelope dict and two copies per message."""
    if not messages:
        return b""
    dumps = codec.dumps
    return _SUCCESS_TAIL.join([_SUCCESS_HEAD + dumps(message) for message in messages]) + _SUCCESS_TAIL


def sse_error(codec: Codec, error_type: str, message: str, args: dict[str, Any] | None = None) -> bytes:
    """The final SSE event of a stream that ended with an error.

    As upstream: the outer type is ``PluginInvokeError`` and its message is the JSON of the
    ``{message, error_type, args}`` the plugin (or the daemon, e.g. a failed output
    validation) gave, so Dify's client sees ``error_type`` only after decoding twice.
    """
    return b"data: " + codec.dumps(stream_error(SessionError(error_type, message, args))) + b"\n\n"


def sse_daemon_error(codec: Codec, message: str) -> bytes:
    """A final SSE event for the daemon's own failure (a timeout): ``PluginDaemonInternalServerError``."""
    return b"data: " + codec.dumps(envelope(-500, INTERNAL_ERROR, message)) + b"\n\n"
