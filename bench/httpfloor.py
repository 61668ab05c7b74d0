"""What the HTTP layer alone costs per request: the floor under any dispatch path.

Three servers answer every POST with the same canned 1-event SSE response, no plugin
behind them, under the benchmark's closed-loop load:

* ``raw``: a bare asyncio protocol that frames requests by hand (as ``bench/relay.py``);
* ``inplace``: uvicorn's httptools protocol answering in its parser callback;
* ``task``: the same protocol running a task per request, as the daemon's direct dispatch does.

    python -m bench.httpfloor --repeats 3 --duration 3
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time

import psutil
import uvloop

from bench.loadgen import request_bytes, run_load
from daemon.testing import free_port

RESPONSE = (
    b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n"
    b'19\r\ndata: {"code":0,"a":12}\n\n\r\n0\r\n\r\n'
)

SERVER_SOURCE = r"""
import ast, asyncio, sys, uvloop, uvicorn
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
RESPONSE = ast.literal_eval(sys.argv[3])
mode, port = sys.argv[1], int(sys.argv[2])

class Raw(asyncio.Protocol):
    def connection_made(self, transport):
        self.transport, self.buffer = transport, b""
    def data_received(self, data):
        self.buffer += data
        while (end := self.buffer.find(b"\r\n\r\n")) >= 0:
            length = 0
            for line in self.buffer[:end].split(b"\r\n")[1:]:
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"content-length":
                    length = int(value)
            if len(self.buffer) < end + 4 + length:
                return
            self.buffer = self.buffer[end + 4 + length:]
            self.transport.write(RESPONSE)

class Cycle:
    class Event:
        def set(self): pass
    message_event = Event()
    def __init__(self, protocol):
        self.protocol, self.body, self.more_body = protocol, bytearray(), True
        self.disconnected, self.keep_alive, self.response_complete = False, True, False
    async def run_asgi(self, app):
        await asyncio.sleep(0)
        self.protocol.transport.write(RESPONSE)
        self.response_complete = True
        self.protocol.on_response_complete()

class Uvicorn(HttpToolsProtocol):
    def on_headers_complete(self):
        self.cycle = Cycle(self)
        if mode == "task":
            self._start_asgi_task(self.cycle, None)
    def on_message_complete(self):
        if mode == "inplace":
            self.transport.write(RESPONSE)
            self.cycle.response_complete = True
            self.on_response_complete()

async def main():
    if mode == "raw":
        await asyncio.get_running_loop().create_server(Raw, "127.0.0.1", port)
        await asyncio.Future()
    config = uvicorn.Config(
        lambda: None, factory=True, http=Uvicorn, port=port, log_level="warning", lifespan="off"
    )
    await uvicorn.Server(config).serve()

uvloop.run(main())
"""

MODES = ("raw", "inplace", "task")


async def _trial(port: int, process: psutil.Process, duration: float) -> tuple[float, float]:
    request = request_bytes("127.0.0.1", port, "/x", {"content-type": "application/json"}, {"a": 1})
    before = process.cpu_times()
    load = await run_load("127.0.0.1", port, request, concurrency=16, duration=duration)
    after = process.cpu_times()
    cpu = after.user + after.system - before.user - before.system
    return cpu / max(load.invocations, 1) * 1e6, load.invocations / load.elapsed


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--duration", type=float, default=3.0)
    args = parser.parse_args()
    servers = []
    for mode in MODES:
        port = free_port()
        child = subprocess.Popen([sys.executable, "-c", SERVER_SOURCE, mode, str(port), repr(RESPONSE)])
        servers.append((mode, port, child))
    try:
        time.sleep(2)
        results: dict[str, list[float]] = {mode: [] for mode in MODES}
        for repeat in range(args.repeats):  # interleaved: raw, inplace, task, raw, ...
            for mode, port, child in servers:
                us, rate = uvloop.run(_trial(port, psutil.Process(child.pid), args.duration))
                results[mode].append(us)
                print(f"r{repeat} {mode:8s} {us:7.1f} µs/request {rate:8.0f} requests/s", flush=True)
        print("| server | CPU µs/request, per repeat |\n| --- | --- |")
        for mode in MODES:
            print(f"| {mode} | {' / '.join(f'{us:.1f}' for us in results[mode])} |")
    finally:
        for _, _, child in servers:
            child.kill()


if __name__ == "__main__":
    main()
