"""The stream between the reader thread and a session's consumer: write, wake, read.

``same thread`` is the floor: put and receive with no wake-up. ``cross-thread``
is the real path: a producer thread puts batches while the consumer awaits them on
the event loop, so every batch that finds the consumer waiting costs a
``call_soon_threadsafe`` wake-up. Rounds are 1000 batches; divide by 1000 for one.
A producer that runs ahead (it holds the GIL for a switch interval) leaves several
batches per receive, as the reader thread does in the daemon; ``extra_info``
records how many receives (consumer wake-ups) a round took.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from typing import Any

import pytest

from bench.messages import text_message
from daemon.stream import Stream

BATCHES = 1000
MESSAGE = text_message(16)


@pytest.fixture
def loop() -> Iterator[asyncio.AbstractEventLoop]:
    loop = asyncio.new_event_loop()
    yield loop
    loop.close()


@pytest.mark.parametrize("batch_size", [1, 16])
@pytest.mark.parametrize("producer", ["same thread", "cross-thread"])
def test_stream_1000_batches(
    benchmark: Any, loop: asyncio.AbstractEventLoop, producer: str, batch_size: int
) -> None:
    benchmark.group = "stream write+read, 1000 batches"
    batch = [MESSAGE] * batch_size
    receives: list[int] = []

    async def cycle() -> int:
        stream: Stream[Any] = Stream(loop, 1 << 30)
        received = 0
        receives.append(0)
        if producer == "same thread":
            for _ in range(BATCHES):
                stream.put_many(batch, 16 * batch_size)
                received += len(await stream.receive_batch())
                receives[-1] += 1
            return received

        def produce() -> None:
            for _ in range(BATCHES):
                stream.put_many(batch, 16 * batch_size)
            stream.close()

        thread = threading.Thread(target=produce)
        thread.start()
        while chunk := await stream.receive_batch():
            received += len(chunk)
            receives[-1] += 1
        thread.join()
        return received

    assert benchmark.pedantic(lambda: loop.run_until_complete(cycle()), rounds=30) == BATCHES * batch_size
    receives.sort()
    benchmark.extra_info["median_receives_per_round"] = receives[len(receives) // 2]
