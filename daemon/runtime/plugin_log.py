"""What a plugin writes that lands in the daemon's log, at a bounded rate.

A plugin's stderr, its ``log`` and ``error`` events and its stray stdout lines are copied into
the daemon's log, one record each. Unbounded, a plugin printing in a loop would fill the
operator's disk and spend the event loop on formatting records; so each stream has a budget
of bytes per second, and what goes over it is counted and reported once the second is over.
"""

from __future__ import annotations

import logging
import time

log = logging.getLogger("daemon.runtime")

LOG_BYTES_PER_S = 64 * 1024  # one stream of one plugin instance, copied into the log, at most


class LogBudget:
    """The log budget of one stream of one instance (used by one thread)."""

    def __init__(self, plugin: str, stream: str, per_second: int = LOG_BYTES_PER_S) -> None:
        self._plugin = plugin
        self._stream = stream
        self._per_second = per_second
        self._window_start = time.monotonic()
        self._window_bytes = 0
        self._suppressed = 0

    def allow(self, nbytes: int) -> bool:
        """Whether a record of about ``nbytes`` may be logged now; counted either way."""
        now = time.monotonic()
        if now - self._window_start >= 1.0:
            self.flush()
            self._window_start, self._window_bytes = now, 0
        self._window_bytes += nbytes
        if self._window_bytes <= self._per_second:
            return True
        if not self._suppressed:
            log.warning(
                "plugin %s: more than %d bytes/s of %s; not logging the rest of this second",
                self._plugin,
                self._per_second,
                self._stream,
            )
        self._suppressed += nbytes
        return False

    def flush(self) -> None:
        """Report what went unlogged (at the end of a second, and when the stream ends)."""
        if self._suppressed:
            log.warning(
                "plugin %s: %d bytes of %s not logged (more than %d bytes/s)",
                self._plugin,
                self._suppressed,
                self._stream,
                self._per_second,
            )
            self._suppressed = 0
