"""How a session can end badly: the error types of the final SSE event."""

from __future__ import annotations

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
INSTANCE_DIED = "PluginInstanceDiedError"
SLOW_CLIENT = "SlowClientError"
TIMEOUT = "PluginExecutionTimeoutError"
CLIENT_GONE = "ClientDisconnected"
SHUTDOWN = "DaemonShuttingDownError"
