"""A lean HTTP/1.1 load generator for SSE invocations, on keep-alive connections.

One connection per concurrent session; each issues invocations back to back until
the deadline, then finishes the one in flight. Per invocation it records the time
to the first event (request written -> first SSE bytes), the number of events and
how the invocation ended (the last event's ``code`` and ``error_type``). The
client is kept cheap (asyncio protocols, de-chunking by hand, no JSON per event)
because it shares the machine's two cores with the server and the plugin.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from daemon.errors import unwrap


@dataclass
class LoadResult:
    invocations: int = 0
    events: int = 0
    body_bytes: int = 0
    elapsed: float = 0.0
    ttfe: list[float] = field(default_factory=list)
    outcomes: Counter[str] = field(default_factory=Counter)


class _Response:
    """Incremental parse of one chunked SSE response."""

    __slots__ = ("body", "chunk_left", "done", "first_at", "head", "state", "tail")

    def __init__(self) -> None:
        self.head = True
        self.tail = b""  # unparsed bytes (head or chunk-size line)
        self.chunk_left = 0
        self.state = "size"
        self.body = bytearray()
        self.first_at = 0.0
        self.done: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def feed(self, data: bytes) -> bytes:
        """Consume ``data``; return what is left over after the response ended."""
        if self.head:
            data = self.tail + data
            end = data.find(b"\r\n\r\n")
            if end < 0:
                self.tail = data
                return b""
            status = data[: data.find(b"\r\n")]
            if b" 200 " not in status:
                raise RuntimeError(f"unexpected response: {data[:200]!r}")
            self.head, self.tail, data = False, b"", data[end + 4 :]
        view = self.tail + data if self.tail else data
        self.tail = b""
        pos = 0
        while pos < len(view):
            if self.state == "size":
                nl = view.find(b"\r\n", pos)
                if nl < 0:
                    self.tail = view[pos:]
                    return b""
                self.chunk_left = int(view[pos:nl], 16)
                pos = nl + 2
                if self.chunk_left == 0:
                    self.state = "trailer"
                else:
                    self.state = "data"
            elif self.state == "data":
                take = min(self.chunk_left, len(view) - pos)
                if not self.body:
                    self.first_at = time.perf_counter()
                self.body += view[pos : pos + take]
                pos += take
                self.chunk_left -= take
                if self.chunk_left == 0:
                    self.state = "crlf"
            elif self.state == "crlf":
                if len(view) - pos < 2:
                    self.tail = view[pos:]
                    return b""
                pos += 2
                self.state = "size"
            else:  # trailer: the empty line after the last chunk
                if len(view) - pos < 2:
                    self.tail = view[pos:]
                    return b""
                pos += 2
                self.done.set_result(None)
                return view[pos:]
        return b""


class _Client(asyncio.Protocol):
    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.response: _Response | None = None
        self.lost: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's is not a subclass

    def data_received(self, data: bytes) -> None:
        response = self.response
        if response is None:
            return
        try:
            left = response.feed(data)
        except Exception as exc:
            if not response.done.done():
                response.done.set_exception(exc)
            return
        if left:
            response.done.set_exception(RuntimeError("bytes after the end of a response"))

    def connection_lost(self, exc: Exception | None) -> None:
        if self.response is not None and not self.response.done.done():
            self.response.done.set_exception(ConnectionError(f"connection lost: {exc}"))
        if not self.lost.done():
            self.lost.set_result(None)


def outcome(body: bytes | bytearray) -> str:
    """``ok`` or the ``error_type`` of the last event (errors are JSON inside JSON, as upstream)."""
    start = body.rfind(b"data: ")
    if start < 0:
        return "no events"
    last = json.loads(bytes(body[start + 6 :]))
    if last["code"] == 0:
        return "ok"
    return str(unwrap(last["message"]).get("error_type"))


def request_bytes(host: str, port: int, path: str, headers: dict[str, str], body: dict[str, Any]) -> bytes:
    payload = json.dumps(body).encode()
    lines = [f"POST {path} HTTP/1.1", f"host: {host}:{port}", f"content-length: {len(payload)}"]
    lines += [f"{name}: {value}" for name, value in headers.items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + payload


async def run_load(
    host: str, port: int, request: bytes, *, concurrency: int, duration: float, rate: float | None = None
) -> LoadResult:
    """Drive ``concurrency`` connections for ``duration`` seconds (plus the tail in flight).

    With ``rate``, at most that many requests a second in all: each connection sends
    its next request at its next slot (``concurrency / rate`` apart), not at once.
    """
    loop = asyncio.get_running_loop()
    result = LoadResult()
    deadline = time.perf_counter() + duration
    interval = concurrency / rate if rate else 0.0

    async def worker() -> None:
        _, client = await loop.create_connection(_Client, host, port)
        assert client.transport is not None
        try:
            slot = time.perf_counter() + interval * random.random()
            while time.perf_counter() < deadline:
                if interval:
                    await asyncio.sleep(max(0.0, slot - time.perf_counter()))
                    slot += interval
                response = client.response = _Response()
                sent_at = time.perf_counter()
                client.transport.write(request)
                await response.done
                result.invocations += 1
                result.events += response.body.count(b"data: ")
                result.body_bytes += len(response.body)
                result.ttfe.append(response.first_at - sent_at)
                result.outcomes[outcome(response.body)] += 1
        finally:
            client.transport.close()

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    result.elapsed = time.perf_counter() - started
    return result


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100) of a non-empty list."""
    ordered = sorted(values)
    rank = max(0, min(len(ordered) - 1, round(q / 100 * len(ordered) + 0.5) - 1))
    return ordered[rank]
