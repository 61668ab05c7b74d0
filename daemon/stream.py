"""A bounded stream from producer threads to one asyncio consumer.

The plugin's stdout is read by a thread, while a session is consumed by the
request's task on the event loop. ``anyio``'s memory object streams are loop-only,
so this is the one queue written by hand: producers append whole batches under a
plain lock and wake the consumer at most once per batch (never once per message).

Semantics the rest of the daemon relies on:

* ``close()`` is idempotent; the first close wins and later ones are ignored.
* ``put_many()`` after close drops the items and returns False; it never raises.
* An error given to ``close()`` is raised to the consumer *after* every item queued
  before the close has been received.
* The buffer is bounded in bytes: a producer that would exceed it closes the
  stream with :class:`StreamOverflow` instead of blocking, so one slow consumer
  never stalls the producer thread (and with it every other session of a plugin).
  A shared :class:`~daemon.limits.Budget` bounds the bytes of all streams together
  the same way; ``discard()`` returns what nobody will receive any more.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections import deque
from collections.abc import Iterable
from typing import Generic, TypeVar

from daemon.limits import Budget

T = TypeVar("T")


class StreamOverflow(Exception):
    """The consumer fell behind by more than the stream's byte budget."""


class Stream(Generic[T]):
    def __init__(self, loop: asyncio.AbstractEventLoop, max_bytes: int, budget: Budget | None = None) -> None:
        self._loop = loop
        self._budget = budget
        self._loop_thread = threading.get_ident()
        self._max_bytes = max_bytes
        self._lock = threading.Lock()
        self._items: deque[T] = deque()
        self._bytes = 0
        self._closed = False
        self._error: BaseException | None = None
        self._waiter: asyncio.Future[None] | None = None
        self.received_items = 0
        self.peak_bytes = 0

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def overflowed(self) -> bool:
        return isinstance(self._error, StreamOverflow)

    @property
    def error(self) -> BaseException | None:
        return self._error

    @property
    def buffered_bytes(self) -> int:
        return self._bytes

    def put_many(self, items: Iterable[T], nbytes: int) -> bool:
        """Queue ``items`` (``nbytes`` is their wire size, for the budget)."""
        with self._lock:
            if self._closed:
                return False
            accepted = self._bytes + nbytes <= self._max_bytes
            shared = accepted and (self._budget is None or self._budget.take(nbytes))
            if not accepted:
                self._closed = True
                self._error = StreamOverflow(
                    f"the client fell more than {self._max_bytes} bytes behind the plugin"
                )
            elif not shared:
                accepted = False
                self._closed = True
                self._error = StreamOverflow(
                    "the daemon's buffers for slow clients are full "
                    f"({self._budget.limit if self._budget else 0} bytes across all sessions)"
                )
            else:
                self._items.extend(items)
                self._bytes += nbytes
                self.peak_bytes = max(self.peak_bytes, self._bytes)
            waiter, self._waiter = self._waiter, None
        self._wake(waiter)
        return accepted

    def discard(self) -> None:
        """Drop what is still queued (its consumer is gone) and return it to the budget."""
        with self._lock:
            self._items.clear()
            if self._budget is not None:
                self._budget.give(self._bytes)
            self._bytes = 0

    def close(self, error: BaseException | None = None) -> bool:
        """End the stream; return True if this call closed it."""
        with self._lock:
            if self._closed:
                return False
            self._closed = True
            self._error = error
            waiter, self._waiter = self._waiter, None
        self._wake(waiter)
        return True

    async def receive_batch(self) -> list[T]:
        """Everything queued so far; ``[]`` at a clean end; raises a close error last."""
        while True:
            with self._lock:
                if self._items:
                    batch = list(self._items)
                    self._items.clear()
                    if self._budget is not None:
                        self._budget.give(self._bytes)
                    self._bytes = 0
                    self.received_items += len(batch)
                    return batch
                if self._closed:
                    if self._error is not None:
                        raise self._error
                    return []
                waiter = self._waiter = self._loop.create_future()
            try:
                await waiter  # whoever wakes it has taken it from ``_waiter``
            except BaseException:
                with self._lock:
                    if self._waiter is waiter:
                        self._waiter = None
                raise

    def _wake(self, waiter: asyncio.Future[None] | None) -> None:
        if waiter is None:
            return
        if threading.get_ident() == self._loop_thread:
            _resolve(waiter)
        else:
            # A closed loop (shutdown) has nobody waiting any more.
            with contextlib.suppress(RuntimeError):
                self._loop.call_soon_threadsafe(_resolve, waiter)


def _resolve(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_result(None)
