"""The stream between the reader thread and the request's task."""

from __future__ import annotations

import asyncio
import threading

import pytest

from daemon.stream import Stream, StreamOverflow


async def drain(stream: Stream[int]) -> list[int]:
    out: list[int] = []
    while batch := await stream.receive_batch():
        out.extend(batch)
    return out


def test_items_from_threads_arrive_in_order_then_clean_end() -> None:
    async def main() -> list[int]:
        stream: Stream[int] = Stream(asyncio.get_running_loop(), max_bytes=10**9)

        def produce() -> None:
            for start in range(0, 10_000, 100):
                stream.put_many(range(start, start + 100), 100)
            stream.close()

        consumer = asyncio.create_task(drain(stream))
        thread = threading.Thread(target=produce)
        thread.start()
        result = await consumer
        thread.join()
        return result

    assert asyncio.run(main()) == list(range(10_000))


def test_pending_error_comes_after_queued_items() -> None:
    async def main() -> tuple[list[int], BaseException | None]:
        stream: Stream[int] = Stream(asyncio.get_running_loop(), max_bytes=1000)
        stream.put_many([1, 2, 3], 3)
        stream.close(ValueError("boom"))
        got: list[int] = []
        try:
            while batch := await stream.receive_batch():
                got.extend(batch)
        except ValueError as exc:
            return got, exc
        return got, None

    got, error = asyncio.run(main())
    assert got == [1, 2, 3]
    assert isinstance(error, ValueError)


def test_close_is_idempotent_and_first_close_wins() -> None:
    async def main() -> None:
        stream: Stream[int] = Stream(asyncio.get_running_loop(), max_bytes=1000)
        assert stream.close() is True
        assert stream.close(RuntimeError("late")) is False
        assert await stream.receive_batch() == []

    asyncio.run(main())


def test_writes_after_close_are_dropped_not_raised() -> None:
    async def main() -> None:
        stream: Stream[int] = Stream(asyncio.get_running_loop(), max_bytes=1000)
        stream.put_many([1], 1)
        stream.close()
        assert stream.put_many([2], 1) is False
        assert await drain(stream) == [1]

    asyncio.run(main())


def test_overflow_fails_the_stream_without_blocking_the_producer() -> None:
    async def main() -> None:
        stream: Stream[int] = Stream(asyncio.get_running_loop(), max_bytes=100)
        assert stream.put_many([1], 60) is True
        assert stream.put_many([2], 60) is False  # would exceed: the stream fails instead
        assert stream.closed
        assert await stream.receive_batch() == [1]
        with pytest.raises(StreamOverflow):
            await stream.receive_batch()

    asyncio.run(main())


def test_a_waiting_consumer_is_woken_by_a_close_from_another_thread() -> None:
    async def main() -> None:
        stream: Stream[int] = Stream(asyncio.get_running_loop(), max_bytes=100)
        waiting = asyncio.create_task(stream.receive_batch())
        await asyncio.sleep(0)  # the consumer is now parked on its waiter
        threading.Thread(target=stream.close, args=(KeyError("x"),)).start()
        with pytest.raises(KeyError):
            await waiting

    asyncio.run(main())


def test_consumer_memory_is_released_per_batch() -> None:
    async def main() -> None:
        stream: Stream[bytes] = Stream(asyncio.get_running_loop(), max_bytes=1000)
        for _ in range(5):
            assert stream.put_many([b"x" * 900], 900)
            assert stream.buffered_bytes == 900
            await stream.receive_batch()
            assert stream.buffered_bytes == 0

    asyncio.run(main())
