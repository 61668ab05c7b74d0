"""Invocations end to end: real daemon, real fastproto plugin, real HTTP on loopback."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from daemon.testing import Daemon, Event, SSEReader, parse_sse
from tests.test_runtime import FP, last_error, wait_for


async def invoke_async(
    client: httpx.AsyncClient, daemon: Daemon, params: dict[str, Any], tool: str = "emit"
) -> list[Event]:
    reader, events = SSEReader(), []
    async with client.stream("POST", daemon.invoke_url(), **daemon.invocation(FP, tool, params)) as response:
        assert response.status_code == 200
        async for chunk in response.aiter_raw():
            events += reader.feed(chunk)
    return events


def test_events_are_relayed_in_order_with_upstream_framing(
    start: Callable[..., Daemon], fastproto: Callable[..., Path]
) -> None:
    daemon = start(fastproto())
    daemon.wait_ready(FP)
    r = httpx.post(
        daemon.invoke_url(),
        **daemon.invocation(FP, "emit", {"count": 2, "kind": "json", "variables": 2, "stream_chunks": 2}),
    )
    assert r.status_code == 200
    assert r.headers["content-type"] == "text/event-stream"
    first = r.content.split(b"\n\n")[0]
    assert first == (
        b'data: {"code":0,"message":"success","data":{"type":"json","message":'
        b'{"json_object":{"i":0,"pad":"abcdefghijklmnop"}},"meta":null}}'
    )
    events = parse_sse(r.content)
    assert all(e.ok for e in events)
    assert [e.message["type"] for e in events] == ["json"] * 2 + ["variable"] * 5
    assert events[-1].message["message"] == {"variable_name": "done", "variable_value": True, "stream": False}


def test_a_schema_violation_is_the_final_event(
    start: Callable[..., Daemon], fastproto: Callable[..., Path]
) -> None:
    daemon = start(fastproto())
    daemon.wait_ready(FP)
    events = daemon.invoke(FP, "emit", {"count": 1, "violate": True})
    assert [e.ok for e in events] == [True, True, False]
    assert events[-1].raw["code"] == -500 and events[-1].raw["data"] is None
    error = last_error(events)
    assert error["error_type"] == "ToolOutputValidationError"
    assert error["message"] == (
        "output variable 'done' failed 'type': \"not-a-bool\" is not of type \"boolean\""
    )


def test_a_tool_without_output_schema_is_not_validated(
    start: Callable[..., Daemon], fastproto: Callable[..., Path]
) -> None:
    daemon = start(fastproto())
    daemon.wait_ready(FP)
    assert all(e.ok for e in daemon.invoke(FP, "plain", {"count": 1, "violate": True}))


def test_a_plugin_error_mid_stream_is_the_final_event(
    start: Callable[..., Daemon], fastproto: Callable[..., Path]
) -> None:
    daemon = start(fastproto())
    daemon.wait_ready(FP)
    events = daemon.invoke(FP, "emit", {"count": 5, "error_at": 3})
    assert [e.ok for e in events] == [True, True, True, False]
    error = last_error(events)
    assert error["message"] == "fastproto error at message 3"
    assert error["error_type"]  # the plugin's own type, passed through


def test_storage_round_trip_and_unsupported_backwards_calls_fail_fast(
    start: Callable[..., Daemon], fastproto: Callable[..., Path]
) -> None:
    daemon = start(fastproto())
    daemon.wait_ready(FP)
    events = daemon.invoke(
        FP, "plain", {"count": 0, "storage_key": "k", "storage_value": "héllo", "invoke_other": True}
    )
    texts = [e.message["message"]["text"] for e in events if e.message["type"] == "text"]
    assert texts == ["héllo", "backwards invocation type 'tool' is not supported by this daemon"]


def test_a_message_too_deep_to_encode_again_fails_its_session_with_a_final_event(
    start: Callable[..., Daemon], fastproto: Callable[..., Path]
) -> None:
    # Deep enough for orjson to read (1024 levels), too deep for it to write (254).
    daemon = start(fastproto())
    daemon.wait_ready(FP)
    r = httpx.post(daemon.invoke_url(), **daemon.invocation(FP, "emit", {"count": 1, "nested_depth": 400}))
    assert r.status_code == 200, r.text
    error = last_error(parse_sse(r.content))
    assert error["error_type"] == "PluginOutputEncodingError"
    assert "cannot be encoded" in error["message"]
    assert daemon.invoke(FP, "emit", {"count": 1, "nested_depth": 10})[-1].ok
    assert daemon.plugins()[FP]["restarts"] == 0


def test_a_line_too_deep_for_the_stdlib_codec_is_skipped_without_failing_the_instance(
    start: Callable[..., Daemon], fastproto: Callable[..., Path]
) -> None:
    # The standard library's decoder raises RecursionError, not ValueError, this deep.
    daemon = start(fastproto(), codec="json")
    daemon.wait_ready(FP)
    events = daemon.invoke(FP, "emit", {"count": 1, "nested_depth": 100_000})
    assert [e.message["type"] for e in events] == ["text", "variable"]  # the deep line is dropped
    assert all(e.ok for e in events)
    assert "printed non-protocol output" in daemon.log_path.read_text(errors="replace")
    assert daemon.plugins()[FP]["restarts"] == 0


def test_timeout_ends_the_session_with_a_final_error(
    start: Callable[..., Daemon], fastproto: Callable[..., Path]
) -> None:
    daemon = start(fastproto(), plugin_max_execution_timeout=1)
    daemon.wait_ready(FP)
    events = daemon.invoke(FP, "emit", {"count": 2, "hang": True})
    assert [e.ok for e in events[:-1]] == [True] * 3
    error = last_error(events)
    assert error["error_type"] == "PluginDaemonInternalServerError"
    assert error["message"] == "killed by timeout: the plugin did not finish within 1 s"
    wait_for(lambda: daemon.plugins()[FP]["instances"][0]["sessions"] == 0)
    assert daemon.invoke(FP, "emit", {"count": 1})[-1].ok


def test_client_disconnect_ends_the_session_and_the_daemon_carries_on(
    start: Callable[..., Daemon], fastproto: Callable[..., Path]
) -> None:
    daemon = start(fastproto())
    daemon.wait_ready(FP)
    with (
        httpx.Client(timeout=60) as client,
        client.stream(
            "POST",
            daemon.invoke_url(),
            **daemon.invocation(FP, "emit", {"count": 100000, "delay_ms": 1}),
        ) as response,
    ):
        chunks = response.iter_raw()
        next(chunks)
        assert daemon.plugins()[FP]["instances"][0]["sessions"] == 1
    wait_for(lambda: daemon.plugins()[FP]["instances"][0]["sessions"] == 0)
    assert daemon.invoke(FP, "emit", {"count": 1})[-1].ok
    assert daemon.plugins()[FP]["restarts"] == 0


def test_a_slow_client_fails_only_its_own_session(
    start: Callable[..., Daemon], fastproto: Callable[..., Path]
) -> None:
    """A client that stops reading overflows its own buffer; others on the instance carry on."""
    daemon = start(fastproto(), session_buffer_bytes=256 * 1024)
    daemon.wait_ready(FP)
    with (
        httpx.Client(timeout=120) as client,
        client.stream(
            "POST",
            daemon.invoke_url(),
            **daemon.invocation(FP, "emit", {"count": 16384, "size": 2048}),
        ) as slow,
    ):
        # While the slow client reads nothing, the same instance serves another session.
        assert daemon.invoke(FP, "emit", {"count": 50, "variables": 5})[-1].ok
        wait_for(lambda: "the client fell too far behind" in daemon.log())
        events = parse_sse(slow.read())
    assert all(e.ok for e in events[:-1])
    assert len(events) < 16384
    error = last_error(events)
    assert error["error_type"] == "SlowClientError"
    assert "fell more than 262144 bytes behind" in error["message"]


@pytest.mark.parametrize("validator", ["owner"])
def test_owner_verdicts_are_right_under_concurrency_errors_and_disconnects(
    start: Callable[..., Daemon], fastproto: Callable[..., Path], validator: str
) -> None:
    """The correctness property, over many concurrent sessions on two instances."""
    daemon = start(fastproto(), validator=validator, plugin_instances=2)
    daemon.wait_ready(FP, instances=2)

    async def disconnect_early(client: httpx.AsyncClient) -> None:
        params = {"count": 200, "variables": 50, "delay_ms": 1}
        request = daemon.invocation(FP, "emit", params)
        async with client.stream("POST", daemon.invoke_url(), **request) as response:
            async for _ in response.aiter_raw():
                break

    async def main() -> list[Any]:
        async with httpx.AsyncClient(timeout=120, limits=httpx.Limits(max_connections=200)) as client:
            jobs: list[Any] = []
            for i in range(96):
                kind = i % 4
                if kind == 0:
                    jobs.append(
                        invoke_async(client, daemon, {"count": 3, "variables": 40, "stream_chunks": 40})
                    )
                elif kind == 1:
                    jobs.append(invoke_async(client, daemon, {"count": 3, "variables": 40, "violate": True}))
                elif kind == 2:
                    jobs.append(invoke_async(client, daemon, {"count": 3, "variables": 40, "error_at": 20}))
                else:
                    jobs.append(disconnect_early(client))
            return await asyncio.gather(*jobs)

    results = asyncio.run(main())
    for i, events in enumerate(results):
        kind = i % 4
        if kind == 0:
            assert len(events) == 3 + 40 + 40 + 1 and all(e.ok for e in events)
        elif kind == 1:
            assert len(events) == 3 + 40 + 1 + 1
            assert last_error(events)["error_type"] == "ToolOutputValidationError"
        elif kind == 2:
            assert len(events) == 20 + 1
            assert last_error(events)["message"] == "fastproto error at message 20"
    wait_for(lambda: all(i["sessions"] == 0 for i in daemon.plugins()[FP]["instances"]))
    assert daemon.plugins()[FP]["restarts"] == 0


def test_validate_credentials_is_relayed(
    start: Callable[..., Daemon], fastproto: Callable[..., Path]
) -> None:
    daemon = start(fastproto())
    daemon.wait_ready(FP)
    r = httpx.post(
        f"{daemon.url}/plugin/t1/dispatch/tool/validate_credentials",
        headers=daemon.headers(FP),
        json={"user_id": "u", "data": {"provider": "fastproto", "credentials": {"k": "v"}}},
        timeout=60,
    )
    assert r.status_code == 200
    events = parse_sse(r.content)
    assert [e.message for e in events] == [{"result": True}]


def test_sse_reader_handles_events_split_across_chunks() -> None:
    stream = (
        b'data: {"code":0,"message":"success","data":{"a":1}}\n\ndata: {"code":0,"message":"x","data":2}\n\n'
    )
    reader = SSEReader()
    events = []
    for i in range(0, len(stream), 7):
        events += reader.feed(stream[i : i + 7])
    assert [e.raw for e in events] == [json.loads(stream[6:52]), {"code": 0, "message": "x", "data": 2}]


def test_owner_verdict_is_right_behind_a_slow_reader(
    start: Callable[..., Daemon], fastproto: Callable[..., Path]
) -> None:
    """12 MB of output ahead of the variables: the consumer lags far behind the plugin's end."""
    daemon = start(fastproto())
    daemon.wait_ready(FP)
    params = {"count": 3000, "size": 4096, "variables": 30, "stream_chunks": 30, "violate": True}
    reader, events = SSEReader(), []
    with (
        httpx.Client(timeout=120) as client,
        client.stream("POST", daemon.invoke_url(), **daemon.invocation(FP, "emit", params)) as response,
    ):
        for chunk in response.iter_raw(16384):
            events += reader.feed(chunk)
            time.sleep(0.0005)
    assert len(events) == 3000 + 30 + 30 + 1 + 1
    assert all(e.ok for e in events[:-1])
    assert last_error(events)["message"] == (
        "output variable 'done' failed 'type': \"not-a-bool\" is not of type \"boolean\""
    )


def test_the_deadline_covers_a_request_the_plugin_never_reads(
    start: Callable[..., Daemon], fastproto: Callable[..., Path]
) -> None:
    # The plugin heartbeats but never reads its stdin: once the pipe and the write buffer are
    # full, sending the request waits; that wait counts against the execution timeout too.
    daemon = start(fastproto({"stall_stdin": True}), plugin_max_execution_timeout=2)
    daemon.wait_ready(FP)
    pad = "x" * 400_000  # two of these fill the pipe (64 KiB) and the write buffer (256 KiB)
    with httpx.Client(timeout=60) as client:
        first = client.post(
            daemon.invoke_url(), **daemon.invocation(FP, "emit", {"count": 1, "storage_value": pad})
        )
        second = client.post(
            daemon.invoke_url(), **daemon.invocation(FP, "emit", {"count": 1, "storage_value": pad})
        )
    for r in (first, second):
        assert r.status_code == 200, r.text
        error = last_error(parse_sse(r.content))
        assert "killed by timeout" in error["message"], error


def test_on_a_kept_alive_connection_each_invocation_has_its_whole_timeout(
    start: Callable[..., Daemon], fastproto: Callable[..., Path]
) -> None:
    """The connection's deadline is reused by its requests in turn: one set by an earlier
    request neither ends a later one early nor leaves it without a deadline."""
    daemon = start(fastproto(), plugin_max_execution_timeout=1)
    daemon.wait_ready(FP)
    with httpx.Client(timeout=60) as client:
        for _ in range(3):
            fast = client.post(daemon.invoke_url(), **daemon.invocation(FP, "emit", {"count": 1}))
            assert parse_sse(fast.content)[-1].ok
            time.sleep(0.3)
        started = time.monotonic()
        slow = client.post(daemon.invoke_url(), **daemon.invocation(FP, "emit", {"count": 1, "hang": True}))
        ended = time.monotonic()
    error = last_error(parse_sse(slow.content))
    assert error["message"] == "killed by timeout: the plugin did not finish within 1 s"
    assert ended - started >= 1  # not ended by a deadline an earlier request set
