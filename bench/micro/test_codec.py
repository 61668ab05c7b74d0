"""JSON decode of plugin lines and encode of SSE events, stdlib ``json`` vs ``orjson``.

Decode is what the reader thread does per plugin line (``codec.loads``); encode is
what the relay does per event (``sse_success``: envelope, dumps, SSE framing).
Each group holds both codecs, so the printed table shows their ratio directly.
"""

from __future__ import annotations

from typing import Any

import pytest

from bench.messages import plugin_line, tool_messages
from daemon.wire import CODECS, sse_success

MESSAGES = tool_messages()
CODEC_NAMES = sorted(CODECS)


@pytest.mark.parametrize("label", list(MESSAGES))
@pytest.mark.parametrize("codec_name", CODEC_NAMES)
def test_decode_plugin_line(benchmark: Any, codec_name: str, label: str) -> None:
    benchmark.group = f"decode {label}"
    codec, line = CODECS[codec_name], plugin_line(MESSAGES[label])
    decoded = benchmark(codec.loads, line)
    assert decoded["data"]["data"] == MESSAGES[label]


@pytest.mark.parametrize("label", list(MESSAGES))
@pytest.mark.parametrize("codec_name", CODEC_NAMES)
def test_encode_sse_event(benchmark: Any, codec_name: str, label: str) -> None:
    benchmark.group = f"encode {label}"
    codec, message = CODECS[codec_name], MESSAGES[label]
    event = benchmark(sse_success, codec, message)
    assert event.startswith(b"data: {") and event.endswith(b"}\n\n")
