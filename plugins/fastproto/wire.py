"""The dify_plugin stdio wire format, reproduced with the standard library only.

Every line matches what dify_plugin 0.10.2 writes (same keys, same order, compact
JSON, raw UTF-8), so a daemon cannot tell this plugin from an SDK one.
"""

from __future__ import annotations

import json
import os
import queue
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any

# pydantic's model_dump_json: no spaces, non-ASCII left as UTF-8.
_encode = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode

# A tool yields (message type, message body); the runtime wraps it in the envelope.
ToolMessage = tuple[str, dict[str, Any]]
ToolStream = Iterator[ToolMessage]

BACKWARDS_TIMEOUT_S = 250.0  # the SDK's MAX_INVOCATION_TIMEOUT default


class Output:
    """Locked stdout: concurrent sessions must never interleave within a line."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._out = sys.stdout.buffer
        self._closed = False

    def raw(self, text: str) -> None:
        """Write text as-is; once stdout is gone, writes are dropped, never raised."""
        data = text.encode("utf-8")
        with self._lock:
            if self._closed:
                return
            try:
                self._out.write(data)
                self._out.flush()
            except (OSError, ValueError):
                self._closed = True

    def close(self) -> None:
        """Close the pipe the daemon reads (EOF for it) while the process keeps running."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            # dup2 over fd 1 drops the pipe yet keeps fd 1 taken, so no file can reuse it.
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, 1)
            os.close(devnull)

    def event(self, event: str, session_id: str | None, data: Any) -> None:
        self.raw(_encode({"event": event, "session_id": session_id, "data": data}) + "\n\n")

    def session(self, session_id: str, kind: str, data: dict[str, Any]) -> None:
        self.event("session", session_id, {"type": kind, "data": data})

    def stream(self, session_id: str, message_type: str, message: dict[str, Any]) -> None:
        body = {"type": message_type, "message": message, "meta": None}
        self.session(session_id, "stream", body)

    def heartbeat(self) -> None:
        self.event("heartbeat", None, {})

    def log(self, message: str) -> None:
        """The SDK's logging formatter uses plain json.dumps and a single newline."""
        record = {"level": "INFO", "message": message, "timestamp": time.time()}
        self.raw(json.dumps({"event": "log", "data": record}) + "\n")


class ValidationError(Exception):
    """Named like pydantic's, which the SDK raises for a malformed backwards_response."""


def check_reply(reply: dict[str, Any]) -> None:
    """Be as strict as the SDK's BackwardsInvocationResponseEvent model."""
    if reply.get("event") not in ("response", "error", "end"):
        raise ValidationError(f"backwards_response: invalid event {reply.get('event')!r}")
    if not isinstance(reply.get("message"), str):
        raise ValidationError("backwards_response: message must be a string")
    if not isinstance(reply.get("data"), dict | None):
        raise ValidationError("backwards_response: data must be an object or null")


class Backwards:
    """Routes backwards_response lines from stdin to the session thread awaiting them."""

    def __init__(self, out: Output) -> None:
        self._out = out
        self._lock = threading.Lock()
        self._waiting: dict[str, queue.SimpleQueue[dict[str, Any]]] = {}

    def route(self, data: dict[str, Any]) -> None:
        """Called by the stdin reader; unknown ids are dropped, as the SDK does."""
        with self._lock:
            waiter = self._waiting.get(str(data.get("backwards_request_id")))
        if waiter is not None:
            waiter.put(data)

    def call(self, session_id: str, kind: str, request: dict[str, Any]) -> dict[str, Any] | None:
        """Send one invoke and return its first response's data (None if it just ended).

        Mirrors the SDK: an `error` event raises with its message; `end` or a null
        `data` before any response means no data.
        """
        request_id = os.urandom(16).hex()
        waiter: queue.SimpleQueue[dict[str, Any]] = queue.SimpleQueue()
        with self._lock:
            self._waiting[request_id] = waiter
        try:
            invoke = {"type": kind, "backwards_request_id": request_id, "request": request}
            self._out.session(session_id, "invoke", invoke)
            # Failures raise a bare Exception: the same error_type the SDK reports.
            try:
                reply = waiter.get(timeout=BACKWARDS_TIMEOUT_S)
            except queue.Empty:
                seconds = int(BACKWARDS_TIMEOUT_S)
                msg = f"invocation exited without response after {seconds} seconds"
                raise Exception(msg) from None
            check_reply(reply)
            if reply.get("event") == "error":
                raise Exception(str(reply.get("message")))
            if reply.get("event") == "end" or reply.get("data") is None:
                return None
            return dict(reply["data"])
        finally:
            with self._lock:
                self._waiting.pop(request_id, None)


class StorageInvocationError(Exception):
    """Same name as the SDK's, so error_type matches in the daemon's error events."""


class Session:
    """What a tool may touch: its session id, stdout, backwards calls, process heartbeats."""

    def __init__(
        self,
        session_id: str,
        out: Output,
        backwards: Backwards,
        heartbeats_stopped: threading.Event,
        context: dict[str, Any] | None = None,
    ) -> None:
        self.session_id = session_id
        self.out = out
        self.backwards = backwards
        self.heartbeats_stopped = heartbeats_stopped
        self.context = context or {}  # the request envelope's context (trace context included)

    def storage_set(self, key: str, value: bytes) -> None:
        request = {"opt": "set", "key": key, "value": value.hex()}
        reply = self.backwards.call(self.session_id, "storage", request)
        if reply is not None and reply.get("data") != "ok":
            raise StorageInvocationError(f"unexpected data: {reply.get('data')}")

    def storage_get(self, key: str) -> bytes:
        reply = self.backwards.call(self.session_id, "storage", {"opt": "get", "key": key})
        if reply is None:
            raise StorageInvocationError("no data found")
        return bytes.fromhex(str(reply["data"]))
