"""The daemon cannot tell an SDK plugin from fastproto: same invocation, same SSE stream."""

from __future__ import annotations

import httpx
import pytest

from daemon.testing import Daemon

TEXTS = ["The cat and the hat.", "", "a a a b b c d", "Ünïcode — works, doesn't it? (yes!)"]


def raw_stream(daemon: Daemon, plugin_id: str, provider: str, text: str) -> bytes:
    r = httpx.post(
        daemon.invoke_url(),
        **daemon.invocation(plugin_id, "word_stats", {"text": text}, provider=provider),
        timeout=60,
    )
    assert r.status_code == 200
    return r.content


@pytest.mark.parametrize("text", TEXTS)
def test_word_stats_is_byte_identical_from_both_plugins(sdk_daemon: Daemon, text: str) -> None:
    sdk = raw_stream(sdk_daemon, "demo/text_toolkit", "text_toolkit", text)
    fast = raw_stream(sdk_daemon, "demo/fastproto", "fastproto", text)
    assert sdk.count(b"data: ") == 5
    assert sdk == fast
