"""A timeout that a connection sets and clears once per request, without a loop timer each time.

A dispatch request arms four timeouts (the time to receive it, its response head's wait for
the first events, the invocation's deadline, the connection's keep-alive wait after it) and
nearly always clears them unexpired. As loop timers each costs 1-2 µs to arm and cancel
(under uvloop a libuv timer started, stopped and closed): the four together were 8-12% of a
1-event invocation's CPU, measured by removing them. Keeping the same timeouts in a structure
of one's own (grouped by expiry, one loop timer for the lot) cost as much in place.

A :class:`Deadline` is reused instead, one per kind of timeout per connection: setting it
stores a time and a callback, clearing it forgets them. The loop timer under it stays armed
for the time it was last armed for; when it fires before the current deadline, it is armed
again for that one. So a connection serving requests back to back arms its timer about once
per timeout period, not once per request, and a deadline still fires on time (never early).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable


class Deadline:
    """One timeout at a time, set and cleared by its owner on the loop's thread."""

    __slots__ = ("_callback", "_closed", "_loop", "_timer", "_timer_at", "_when")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._when: float | None = None
        self._callback: Callable[[], object] | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = 0.0
        self._closed = False

    def set(self, delay: float, callback: Callable[[], object]) -> None:
        """Call ``callback`` in ``delay`` seconds unless cleared first; replaces a deadline set before."""
        when = self._loop.time() + delay
        self._when = when
        self._callback = callback
        if self._timer is None or when < self._timer_at:
            self._arm(when)

    def clear(self) -> None:
        """Nothing fires (the loop timer, if armed, finds nothing due)."""
        self._when = self._callback = None
        if self._closed:
            self._cancel_timer()

    cancel = clear  # what callers of a loop timer's handle call

    def close(self) -> None:
        """Its owner (a connection) is done with it: the loop timer is cancelled now if no
        deadline is set, else once the one set is cleared or fires (whoever set it, a request
        still running, keeps it until then)."""
        self._closed = True
        if self._when is None:
            self._cancel_timer()

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _arm(self, when: float) -> None:
        self._cancel_timer()
        self._timer_at = when
        self._timer = self._loop.call_at(when, self._fire)

    def _fire(self) -> None:
        self._timer = None
        when = self._when
        if when is None:
            return
        if self._loop.time() < when:  # set again since it was armed: wait for that one
            self._arm(when)
            return
        callback = self._callback
        self._when = self._callback = None
        assert callback is not None
        callback()
