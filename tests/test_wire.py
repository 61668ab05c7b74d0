"""The SSE framing of tool messages: the same bytes as the envelope encoded whole, per codec."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from daemon import wire
from tests.strategies import json_values


def _framed_whole(codec: wire.Codec, message: Any) -> bytes:
    """An event as upstream frames it: the whole envelope encoded, after ``data: ``."""
    return b"data: " + codec.dumps({"code": 0, "message": "success", "data": message}) + b"\n\n"


@pytest.mark.parametrize("name", ["orjson", "json"])
@given(messages=st.lists(json_values(), max_size=5))
def test_success_events_are_the_whole_envelope_encoded(name: str, messages: list[Any]) -> None:
    codec = wire.get_codec(name)
    expected = b"".join(_framed_whole(codec, m) for m in messages)
    assert wire.sse_successes(codec, messages) == expected
    assert b"".join(wire.sse_success(codec, m) for m in messages) == expected
    events = [e for e in expected.decode().split("\n\n") if e]
    assert [json.loads(e.removeprefix("data: "))["data"] for e in events] == messages
