"""How a session can end badly: the error types of the final SSE event."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any


class SessionError(Exception):
    """Ends a session; becomes the final SSE error event."""

    def __init__(self, error_type: str, message: str, args: Mapping[str, Any] | None = None):
        super().__init__(message)
        self.error_type = error_type
        self.message = message
        self.details = dict(args or {})

    @classmethod
    def from_plugin(cls, data: Any) -> SessionError:
        if not isinstance(data, Mapping):
            return cls("PluginInvokeError", f"plugin reported an error: {data!r}")
        return cls(
            str(data.get("error_type") or "PluginInvokeError"),
            str(data.get("message") or "plugin reported an error"),
            data.get("args") if isinstance(data.get("args"), Mapping) else None,
        )


# Error types the daemon itself produces (plugins bring their own).
VALIDATION_ERROR = "ToolOutputValidationError"
VALIDATION_CRASH = "ToolOutputValidationCrash"
VALIDATION_TIMEOUT = "ToolOutputValidationTimeout"
VARIABLE_ERROR = "ToolOutputVariableError"
OUTPUT_ENCODING_ERROR = "PluginOutputEncodingError"  # a message the codec read but cannot write
INSTANCE_DIED = "PluginInstanceDiedError"
SLOW_CLIENT = "SlowClientError"
TIMEOUT = "PluginExecutionTimeoutError"
CLIENT_GONE = "ClientDisconnected"
SHUTDOWN = "DaemonShuttingDownError"


# Upstream's outer error types (``internal/types/exception`` in langgenius/dify-plugin-daemon).
# Dify's API server dispatches on these alone; any other outer type becomes a bare Exception.
PLUGIN_INVOKE_ERROR = "PluginInvokeError"  # an error read from a plugin's stream; inner JSON in message
INTERNAL_ERROR = "PluginDaemonInternalServerError"  # timeout, no runtime, the daemon's own failure
BAD_REQUEST = "PluginDaemonBadRequestError"
NOT_FOUND = "PluginDaemonNotFoundError"  # a route or resource that does not exist
PLUGIN_NOT_FOUND = "PluginNotFoundError"  # the plugin is not installed
UNAUTHORIZED = "PluginDaemonUnauthorizedError"


def envelope(
    code: int, error_type: str, message: str, args: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """Upstream's error response: ``message`` is itself the JSON of ``{message, error_type, args}``."""
    inner = json.dumps(
        {"message": message, "error_type": error_type, "args": dict(args) if args is not None else None},
        ensure_ascii=False,
        separators=(",", ":"),
    )
    return {"code": code, "message": inner, "data": None}


def stream_error(error: SessionError) -> dict[str, Any]:
    """An error that ends a stream, wrapped as upstream wraps a plugin's: ``PluginInvokeError``
    whose message is the JSON of the plugin's (or the daemon's) own ``{message, error_type, args}``."""
    inner = json.dumps(
        {"message": error.message, "error_type": error.error_type, "args": error.details},
        ensure_ascii=False,
        separators=(",", ":"),
    )
    return envelope(-500, PLUGIN_INVOKE_ERROR, inner)


def unwrap(message: str) -> dict[str, Any]:
    """The most specific ``{message, error_type, args}`` inside an error event's ``message``:
    the plugin's own error for a ``PluginInvokeError``, else the daemon's."""
    outer = json.loads(message)
    if outer.get("error_type") == PLUGIN_INVOKE_ERROR:
        try:
            inner = json.loads(outer.get("message") or "")
        except ValueError:
            return outer
        if isinstance(inner, dict) and "error_type" in inner:
            return inner
    return outer
