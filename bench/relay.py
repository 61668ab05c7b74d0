"""The baseline: a bare asyncio relay from one plugin process to HTTP callers, no framework.

It does only what any relay must: read the plugin's stdout lines, decode each,
route it by ``session_id``, encode each tool message as an SSE event and write it
to the caller (HTTP/1.1, chunked, keep-alive). No validation, no timeouts, no
disconnect handling, no restarts: the floor the daemon's CPU is compared with.

Two settings make the two baselines of the benchmark:

* ``--codec json`` without ``--coalesce``: stdlib json, one write per event;
* ``--codec orjson --coalesce``: the fast codec, one write per session per chunk
  read from the plugin (what the daemon does per batch).

    python -m bench.relay --port 5003 --plugin plugins/fastproto --python .../python
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import subprocess
import uuid
from pathlib import Path
from typing import Any

from daemon.runtime import plugin_environment
from daemon.wire import Codec, get_codec, sse_error, sse_success, tool_request

RESPONSE_HEAD = (
    b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ncache-control: no-cache\r\n"
    b"transfer-encoding: chunked\r\n\r\n"
)
HEALTH = b'HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 15\r\n\r\n{"status":"ok"}'


class Plugin(asyncio.SubprocessProtocol):
    """The plugin process: requests go to its stdin, its stdout lines are routed here."""

    def __init__(self, relay: Relay) -> None:
        self.relay = relay
        self.transport: asyncio.SubprocessTransport | None = None
        self.stdin: Any = None
        self.pending = b""
        self.ready = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's is not a subclass
        self.stdin = self.transport.get_pipe_transport(0)  # type: ignore[union-attr]

    def pipe_data_received(self, fd: int, data: bytes) -> None:
        if fd != 1:
            return
        data = self.pending + data if self.pending else data
        lines = data.split(b"\n")
        self.pending = lines.pop()
        self.relay.handle_lines(lines)

    def process_exited(self) -> None:
        if not self.ready.done():
            self.ready.set_exception(RuntimeError("the plugin exited before its first heartbeat"))
        self.relay.plugin_died()

    def send(self, line: bytes) -> None:
        self.stdin.write(line)


class Connection(asyncio.Protocol):
    """One HTTP/1.1 keep-alive connection; one request in flight at a time."""

    def __init__(self, relay: Relay) -> None:
        self.relay = relay
        self.transport: asyncio.Transport | None = None
        self.buffer = b""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        while True:
            head_end = self.buffer.find(b"\r\n\r\n")
            if head_end < 0:
                return
            lines = self.buffer[:head_end].split(b"\r\n")
            length = 0
            for line in lines[1:]:
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"content-length":
                    length = int(value)
            end = head_end + 4 + length
            if len(self.buffer) < end:
                return
            body, self.buffer = self.buffer[head_end + 4 : end], self.buffer[end:]
            method = lines[0].split(b" ", 1)[0]
            if method == b"GET":
                self.transport.write(HEALTH)  # type: ignore[union-attr]
            else:
                self.relay.invoke(self, body)

    def write_event(self, body: bytes) -> None:
        self.transport.writelines([b"%x\r\n" % len(body), body, b"\r\n"])  # type: ignore[union-attr]

    def finish(self) -> None:
        self.transport.write(b"0\r\n\r\n")  # type: ignore[union-attr]

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None


class Relay:
    def __init__(self, codec: Codec, coalesce: bool) -> None:
        self.codec = codec
        self.coalesce = coalesce
        self.sessions: dict[str, Connection] = {}
        self.plugin: Plugin | None = None

    def invoke(self, connection: Connection, body: bytes) -> None:
        request = self.codec.loads(body)
        session_id = uuid.uuid4().hex
        self.sessions[session_id] = connection
        envelope = tool_request(
            session_id, user_id=request["user_id"], action="invoke_tool", data=request["data"]
        )
        connection.transport.write(RESPONSE_HEAD)  # type: ignore[union-attr]
        assert self.plugin is not None
        self.plugin.send(self.codec.dumps(envelope) + b"\n")

    def handle_lines(self, lines: list[bytes]) -> None:
        loads, codec = self.codec.loads, self.codec
        batches: dict[str, list[bytes]] = {}
        for line in lines:
            if not line:
                continue
            try:
                obj = loads(line)
            except ValueError:
                continue
            event = obj.get("event")
            if event == "heartbeat":
                assert self.plugin is not None
                if not self.plugin.ready.done():
                    self.plugin.ready.set_result(None)
                continue
            if event != "session":
                continue
            session_id = obj["session_id"]
            connection = self.sessions.get(session_id)
            if connection is None:
                continue
            data = obj["data"]
            kind = data["type"]
            if kind == "stream":
                event_bytes = sse_success(codec, data["data"])
                if self.coalesce:
                    batches.setdefault(session_id, []).append(event_bytes)
                else:
                    connection.write_event(event_bytes)
            elif kind in ("end", "error"):
                batch = batches.pop(session_id, None)
                if batch:
                    connection.write_event(b"".join(batch))
                if kind == "error":
                    error = data["data"]
                    connection.write_event(sse_error(codec, error["error_type"], error["message"]))
                del self.sessions[session_id]
                if connection.transport is not None:
                    connection.finish()
        for session_id, batch in batches.items():
            connection = self.sessions[session_id]
            if connection.transport is not None:
                connection.write_event(b"".join(batch))

    def plugin_died(self) -> None:
        for connection in self.sessions.values():
            if connection.transport is not None:
                connection.transport.close()
        self.sessions.clear()


async def serve(port: int, plugin_dir: Path, python: Path, codec: str, coalesce: bool) -> None:
    loop = asyncio.get_running_loop()
    relay = Relay(get_codec(codec), coalesce)
    transport, plugin = await loop.subprocess_exec(
        lambda: Plugin(relay),
        str(python),
        "-m",
        "main",
        cwd=plugin_dir,
        env=plugin_environment(python),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
    )
    relay.plugin = plugin
    await asyncio.wait_for(plugin.ready, 60)
    server = await loop.create_server(lambda: Connection(relay), "127.0.0.1", port)
    stop = loop.create_future()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set_result, None)
    print(f"relay ready on 127.0.0.1:{port} (codec {codec}, coalesce {coalesce})", flush=True)
    try:
        await stop
    finally:
        server.close()
        transport.kill()
        transport.close()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--plugin", type=Path, required=True, help="the plugin directory (fastproto)")
    parser.add_argument("--python", type=Path, required=True, help="the plugin's interpreter")
    parser.add_argument("--codec", choices=["json", "orjson"], default="json")
    parser.add_argument("--coalesce", action="store_true", help="one write per session per chunk read")
    args = parser.parse_args()
    import uvloop

    uvloop.run(serve(args.port, args.plugin, args.python, args.codec, args.coalesce))


if __name__ == "__main__":
    main()
