"""The event-stream response ends its own task on disconnect, and never swallows another cancel."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from daemon.sse import EventStreamResponse, SendBody


async def _forever(send_body: SendBody) -> None:
    await send_body(b"data: 1\n\n")
    await asyncio.Event().wait()


def _asgi(disconnect: asyncio.Event) -> tuple[Any, Any, list[dict[str, Any]]]:
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        await disconnect.wait()
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    return receive, send, sent


def test_a_disconnect_ends_the_producer_and_the_response_returns() -> None:
    async def go() -> tuple[list[str], list[dict[str, Any]]]:
        disconnect = asyncio.Event()
        receive, send, sent = _asgi(disconnect)
        calls: list[str] = []
        response = EventStreamResponse(_forever, lambda: calls.append("gone"))
        task = asyncio.create_task(response({}, receive, send))
        await asyncio.sleep(0.01)
        disconnect.set()
        await asyncio.wait_for(task, 10)  # returns normally: the cancel was the response's own
        return calls, sent

    calls, sent = asyncio.run(go())
    assert calls == ["gone"]
    assert [m.get("body") for m in sent if m["type"] == "http.response.body"] == [b"data: 1\n\n"]


def test_a_cancel_from_outside_still_cancels() -> None:
    async def go() -> None:
        receive, send, _ = _asgi(asyncio.Event())
        response = EventStreamResponse(_forever, lambda: None)
        task = asyncio.create_task(response({}, receive, send))
        await asyncio.sleep(0.01)
        task.cancel()
        await asyncio.wait_for(task, 10)

    with pytest.raises(asyncio.CancelledError):
        asyncio.run(go())


def test_a_cancel_from_outside_during_a_disconnect_is_not_lost() -> None:
    async def go() -> None:
        disconnect = asyncio.Event()
        receive, send, _ = _asgi(disconnect)
        response = EventStreamResponse(_forever, lambda: None)
        task = asyncio.create_task(response({}, receive, send))
        await asyncio.sleep(0.01)
        disconnect.set()
        await asyncio.sleep(0)  # the watcher runs and cancels the response's task
        task.cancel()
        await asyncio.wait_for(task, 10)

    with pytest.raises(asyncio.CancelledError):
        asyncio.run(go())


def test_a_stalled_send_ends_the_response_after_the_write_timeout() -> None:
    async def go() -> list[str]:
        receive, _, _ = _asgi(asyncio.Event())
        calls: list[str] = []

        async def stuck_send(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.body":
                await asyncio.Event().wait()

        response = EventStreamResponse(
            _forever, lambda: calls.append("gone"), write_timeout=0.05, on_stall=lambda: calls.append("stall")
        )
        await asyncio.wait_for(response({}, receive, stuck_send), 10)
        return calls

    assert asyncio.run(go()) == ["stall"]
