"""emit / plain: a configurable message stream with fault injection, for load and fault tests.

"Messages" below are the tool messages this invocation streams (texts from the
storage and invoke_other steps included); error_at and crash_at count them.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from typing import Any

from wire import Session, ToolMessage, ToolStream

PATTERN = "abcdefghijklmnopqrstuvwxyz"
MIB = 1024 * 1024
HELD: list[bytes] = []  # memory the resource faults keep for the life of the process


def as_int(value: Any, default: int) -> int:
    """Numbers arrive as int, float or string depending on the caller."""
    if value is None or value == "":
        return default
    return int(float(value))


def as_bool(value: Any, default: bool) -> bool:
    """Booleans may arrive as strings from form inputs."""
    if value is None or value == "":
        return default
    if isinstance(value, str):
        return value.strip().lower() in ("1", "true", "yes", "on")
    return bool(value)


def padding(size: int) -> str:
    """Deterministic ASCII, so byte length equals character length."""
    return (PATTERN * (size // len(PATTERN) + 1))[:size]


def variable(name: str, value: Any, stream: bool = False) -> ToolMessage:
    return "variable", {"variable_name": name, "variable_value": value, "stream": stream}


def planned(session: Session, params: dict[str, Any]) -> ToolStream:
    """The message sequence itself, before faults and pacing are applied."""
    storage_key = params.get("storage_key")
    if storage_key:
        value = str(params.get("storage_value", "v")).encode("utf-8")
        session.storage_set(str(storage_key), value)
        yield "text", {"text": session.storage_get(str(storage_key)).decode("utf-8")}
    if as_bool(params.get("invoke_other"), False):
        yield "text", {"text": invoke_unsupported(session)}
    if as_bool(params.get("echo_context"), False):
        yield "json", {"json_object": session.context}

    count, size = as_int(params.get("count"), 1), as_int(params.get("size"), 16)
    pad = padding(size)
    as_json = str(params.get("kind") or "text") == "json"
    for i in range(count):
        if as_json:
            yield "json", {"json_object": {"i": i, "pad": pad}}
        else:
            yield "text", {"text": pad}
    for i in range(as_int(params.get("variables"), 0)):
        yield variable(f"var_{i}", i)
    for i in range(as_int(params.get("stream_chunks"), 0)):
        yield variable("streamed", f"c{i};", stream=True)
    if as_bool(params.get("final_done"), True):
        yield variable("done", "not-a-bool" if as_bool(params.get("violate"), False) else True)


def invoke_unsupported(session: Session) -> str:
    """A backwards call of a type the daemon should refuse; returns what came back."""
    request = {"tool_type": "builtin", "provider": "none", "tool": "none", "tool_parameters": {}}
    try:
        reply = session.backwards.call(session.session_id, "tool", request)
    except Exception as exc:
        return str(exc)
    return f"unexpected response: {reply}"


def invoke(session: Session, params: dict[str, Any]) -> ToolStream:
    """Applies the stdout faults, pacing, error_at/crash_at and the never-ending modes."""
    error_at = as_int(params.get("error_at"), -1)
    error_type_size = as_int(params.get("error_type_size"), 0)
    crash_at = as_int(params.get("crash_at"), -1)
    delay_s = as_int(params.get("delay_ms"), 0) / 1000
    stop_heartbeat = as_bool(params.get("stop_heartbeat"), False)
    if stop_heartbeat:
        session.heartbeats_stopped.set()
    resource_faults(params)
    if as_bool(params.get("orphan_pipes"), False):
        # A detached child (its own session, so outside our process group) that inherits
        # stdout and stderr and outlives us: the pipes stay open after this process exits.
        subprocess.Popen([sys.executable, "-c", "import time; time.sleep(3600)"], start_new_session=True)

    flood = as_int(params.get("backwards_flood"), 0)
    # storage calls sent without waiting for their answers: reads, or writes if flood_writes
    request = {"opt": "get", "key": "flood"}
    if as_bool(params.get("flood_writes"), False):
        request = {"opt": "set", "key": "flood", "value": "00"}
    for _ in range(flood):
        invoke = {"type": "storage", "backwards_request_id": os.urandom(8).hex(), "request": request}
        session.out.session(session.session_id, "invoke", invoke)

    for i in range(as_int(params.get("garbage"), 0)):
        session.out.raw(f"fastproto stray print {i}: this line is not JSON\n")
    depth = as_int(params.get("nested_depth"), 0)
    if depth > 0:
        # Written by hand: json.dumps itself gives up past ~1000 levels.
        nested = "[" * depth + "]" * depth
        message = '{"type":"json","message":{"json_object":{"nested":' + nested + '}},"meta":null}'
        head = '{"event":"session","session_id":"' + session.session_id + '","data":{"type":"stream","data":'
        session.out.raw(head + message + "}}\n")
    oversized = as_int(params.get("oversized"), 0)
    if oversized > 0:
        # A real stream message of this session, so the daemon cannot just skip it.
        session.out.stream(session.session_id, "text", {"text": "o" * oversized})

    sent = 0
    for message in planned(session, params):
        check_faults(sent, error_at, crash_at, error_type_size)
        if sent and delay_s > 0:
            time.sleep(delay_s)
        yield message
        sent += 1
    check_faults(sent, error_at, crash_at, error_type_size)

    if stop_heartbeat or as_bool(params.get("hang"), False):
        threading.Event().wait()  # never send end


class FastprotoError(RuntimeError):
    """A tool failure; ``error_type`` is what the session error reports (a long one, if asked)."""

    def __init__(self, message: str, error_type_size: int) -> None:
        super().__init__(message)
        self.error_type = padding(error_type_size) if error_type_size > 0 else "RuntimeError"


def check_faults(sent: int, error_at: int, crash_at: int, error_type_size: int = 0) -> None:
    """Every message before this point is already flushed: the runtime writes as we yield."""
    if sent == crash_at:
        os._exit(3)
    if sent == error_at:
        raise FastprotoError(f"fastproto error at message {sent}", error_type_size)


def resource_faults(params: dict[str, Any]) -> None:
    """Memory kept for good (``allocate_mb`` at once, ``leak_kb`` a little per call) and ``spin``."""
    for _ in range(as_int(params.get("allocate_mb"), 0)):
        HELD.append(b"m" * MIB)  # written, so resident: not just reserved
    leak = as_int(params.get("leak_kb"), 0)
    if leak > 0:
        HELD.append(b"l" * (leak * 1024))
    if as_bool(params.get("spin"), False):
        threading.Thread(target=spin, daemon=True).start()


def spin() -> None:
    """Burn a core forever, as the SDK does when its loop wedges; the session itself ends."""
    while True:
        pass
