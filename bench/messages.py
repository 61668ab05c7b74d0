"""Real protocol messages, byte for byte as the plugins write them, for the benchmarks.

The shapes follow ``plugins/fastproto`` (which matches the SDK on the wire): a text
message padded to a size, and a variable message whose value is a 50-key object.
"""

from __future__ import annotations

import json
from typing import Any

PATTERN = "abcdefghijklmnopqrstuvwxyz"
SIZES = {"16B": 16, "1KiB": 1024, "16KiB": 16 * 1024, "64KiB": 64 * 1024}

# The output_schema of fastproto's emit tool (plugins/fastproto/tools/emit.yaml).
EMIT_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {"done": {"type": "boolean"}, "streamed": {"type": "string"}},
    "patternProperties": {"^var_[0-9]+$": {"type": "integer"}},
    "required": ["done"],
}


def padding(size: int) -> str:
    return (PATTERN * (size // len(PATTERN) + 1))[:size]


def text_message(size: int) -> dict[str, Any]:
    return {"type": "text", "message": {"text": padding(size)}, "meta": None}


def variable_message(name: str, value: Any, stream: bool = False) -> dict[str, Any]:
    return {
        "type": "variable",
        "message": {"variable_name": name, "variable_value": value, "stream": stream},
        "meta": None,
    }


def payload_50_keys() -> dict[str, Any]:
    """A 50-key object of mixed JSON types, as a structured tool output might carry."""
    value: dict[str, Any] = {}
    for i in range(50):
        kind = i % 5
        if kind == 0:
            value[f"key_{i}"] = i
        elif kind == 1:
            value[f"key_{i}"] = i / 7
        elif kind == 2:
            value[f"key_{i}"] = padding(24)
        elif kind == 3:
            value[f"key_{i}"] = i % 2 == 0
        else:
            value[f"key_{i}"] = [i, padding(8), None]
    return value


def tool_messages() -> dict[str, dict[str, Any]]:
    """The tool messages the codec benchmarks use, by label."""
    messages = {f"text {label}": text_message(size) for label, size in SIZES.items() if size != 16 * 1024}
    messages["variable 50 keys"] = variable_message("payload", payload_50_keys())
    return messages


def plugin_line(message: dict[str, Any], session_id: str = "0" * 32) -> bytes:
    """The stdout line a plugin writes for one tool message (compact JSON, raw UTF-8)."""
    envelope = {"event": "session", "session_id": session_id, "data": {"type": "stream", "data": message}}
    return json.dumps(envelope, ensure_ascii=False, separators=(",", ":")).encode()


def emit_outputs(n: int) -> list[dict[str, Any]]:
    """The variable messages of fastproto's emit: n plain, n streamed chunks, then done."""
    return (
        [variable_message(f"var_{i}", i) for i in range(n)]
        + [variable_message("streamed", f"c{i};", stream=True) for i in range(n)]
        + [variable_message("done", True)]
    )
