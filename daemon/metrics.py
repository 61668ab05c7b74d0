"""Prometheus metrics, served on ``/metrics``.

The first three names match upstream Dify's plugin daemon, so existing
dashboards keep working; the rest are ours. Label values are bounded: plugin ids,
instance slots, validator designs and a fixed set of outcomes (a plugin's own
error types all count as ``plugin_error``).
"""

from __future__ import annotations

import collections
import functools
from collections.abc import Callable, Iterable
from typing import Any, NamedTuple

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    disable_created_metrics,
)
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from daemon.config import ValidatorDesign
from daemon.errors import (
    CLIENT_GONE,
    INSTANCE_DIED,
    SHUTDOWN,
    SLOW_CLIENT,
    TIMEOUT,
    VALIDATION_CRASH,
    VALIDATION_ERROR,
    VARIABLE_ERROR,
)

disable_created_metrics()  # the _created series only add noise to dashboards


class _Registry(CollectorRegistry):
    """Applies the sessions recorded since the last scrape before every collection."""

    def collect(self) -> Iterable[Any]:
        flush()
        return super().collect()


REGISTRY = _Registry(auto_describe=True)
ProcessCollector(registry=REGISTRY)
PlatformCollector(registry=REGISTRY)

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300)
FAST_BUCKETS = (0.00001, 0.000025, 0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.05, 0.1)

OUTCOMES = {
    "success": "success",
    VALIDATION_ERROR: "validation_failed",
    VALIDATION_CRASH: "validation_crashed",
    VARIABLE_ERROR: "bad_variable",
    INSTANCE_DIED: "instance_died",
    SLOW_CLIENT: "slow_client",
    TIMEOUT: "timeout",
    CLIENT_GONE: "client_gone",
    SHUTDOWN: "shutdown",
}


TERMINATIONS = ("slow_client", "timeout")


def outcome_label(outcome: str) -> str:
    return OUTCOMES.get(outcome, "plugin_error")


invocations_total = Counter(
    "plugin_invocations_total",
    "Invocations relayed, by plugin, operation and how they ended.",
    ["plugin_id", "operation", "status"],
    registry=REGISTRY,
)
invocation_duration = Histogram(
    "plugin_invocation_duration_seconds",
    "From the request reaching a plugin instance to the last event sent.",
    ["plugin_id", "operation"],
    buckets=LATENCY_BUCKETS,
    registry=REGISTRY,
)
invocations_active = Gauge(
    "plugin_invocations_active", "Invocations in flight.", ["plugin_id"], registry=REGISTRY
)
time_to_first_event = Histogram(
    "plugin_time_to_first_event_seconds",
    "From the request reaching a plugin instance to the first event sent to the caller.",
    ["plugin_id"],
    buckets=LATENCY_BUCKETS,
    registry=REGISTRY,
)
messages_relayed = Counter(
    "plugin_messages_relayed_total", "Tool messages relayed to callers.", ["plugin_id"], registry=REGISTRY
)
bytes_relayed = Counter(
    "plugin_bytes_relayed_total",
    "Bytes read from plugins (in) and written to callers (out).",
    ["plugin_id", "direction"],
    registry=REGISTRY,
)
validation_duration = Histogram(
    "plugin_output_validation_duration_seconds",
    "Time of one output validation.",
    ["design"],
    buckets=FAST_BUCKETS,
    registry=REGISTRY,
)
validations_total = Counter(
    "plugin_output_validations_total",
    "Output validations, by design and verdict (pass, fail, crash).",
    ["design", "verdict"],
    registry=REGISTRY,
)
serialization_seconds = Counter(
    "plugin_serialization_seconds_total",
    "Seconds spent decoding plugin lines (decode) and encoding SSE events (encode).",
    ["direction"],
    registry=REGISTRY,
)
instance_restarts = Counter(
    "plugin_instance_restarts_total",
    "Instance restarts after a crash or kill.",
    ["plugin_id"],
    registry=REGISTRY,
)
session_terminations = Counter(
    "plugin_session_terminations_total",
    "Sessions the daemon ended itself: a slow client or the execution timeout.",
    ["plugin_id", "reason"],
    registry=REGISTRY,
)
session_buffer_peak = Histogram(
    "plugin_session_buffer_peak_bytes",
    "The most bytes a session had queued for its caller at once.",
    ["plugin_id"],
    buckets=(0, 1024, 16384, 65536, 262144, 1048576, 4194304, 16777216),
    registry=REGISTRY,
)

for direction in ("decode", "encode"):
    serialization_seconds.labels(direction)
for design in ValidatorDesign:
    for verdict in ("pass", "fail", "crash"):
        validations_total.labels(design.value, verdict)


def register_plugin(plugin_id: str) -> None:
    """Create a plugin's series up front, so dashboards show zeros rather than gaps."""
    _active(plugin_id)
    instance_restarts.labels(plugin_id)
    messages_relayed.labels(plugin_id)
    for direction in ("in", "out"):
        bytes_relayed.labels(plugin_id, direction)
    for reason in TERMINATIONS:
        session_terminations.labels(plugin_id, reason)


class SessionRecord(NamedTuple):
    """What one ended session adds to its operation's series."""

    outcome: str  # a label from :func:`outcome_label`
    duration: float
    time_to_first_event: float | None
    messages: int
    bytes_in: int
    bytes_out: int
    buffer_peak: int
    encode_seconds: float
    termination: str | None  # one of TERMINATIONS, if the daemon ended the session
    exemplar: dict[str, str] | None


# Sessions ended since the last flush. Each Prometheus update takes a lock and walks its
# buckets; an invocation made about ten of them on the request path. A session is now one
# append here, and the series are brought up to date at every scrape (and every
# ``FLUSH_EVERY`` sessions, which bounds this queue), counters summed once per batch.
_pending: collections.deque[tuple[InvocationSeries, SessionRecord]] = collections.deque()
FLUSH_EVERY = 256


def flush() -> None:
    """Apply the recorded sessions to their series (any thread; each record is applied once)."""
    sums: dict[InvocationSeries, list[Any]] = {}
    pop = _pending.popleft
    while True:
        try:
            series, record = pop()
        except IndexError:
            break
        total = sums.get(series)
        if total is None:
            total = sums[series] = [collections.Counter(), 0, 0, 0, 0.0, collections.Counter()]
        total[0][record.outcome] += 1
        total[1] += record.messages
        total[2] += record.bytes_in
        total[3] += record.bytes_out
        total[4] += record.encode_seconds
        if record.termination is not None:
            total[5][record.termination] += 1
        series.duration.observe(record.duration, record.exemplar)
        if record.time_to_first_event is not None:
            series.time_to_first_event.observe(record.time_to_first_event, record.exemplar)
        series.buffer_peak.observe(record.buffer_peak)
    for series, (outcomes, messages, bytes_in, bytes_out, encode, terminations) in sums.items():
        for outcome, count in outcomes.items():
            series.ended(outcome).inc(count)
        series.messages.inc(messages)
        series.bytes_in.inc(bytes_in)
        series.bytes_out.inc(bytes_out)
        _ENCODE_SECONDS.inc(encode)
        for reason, count in terminations.items():
            series.terminations[reason].inc(count)


_ENCODE_SECONDS = serialization_seconds.labels("encode")


class _Active:
    """A plugin's invocations in flight: a plain count on the loop thread, read at scrape time."""

    def __init__(self, plugin_id: str) -> None:
        self.count = 0
        invocations_active.labels(plugin_id).set_function(lambda: self.count)


@functools.cache
def _active(plugin_id: str) -> _Active:
    return _Active(plugin_id)


class InvocationSeries:
    """One plugin operation's series, resolved once.

    ``labels()`` takes a lock and checks its values on every call; the
    per-invocation path uses these children directly instead.
    """

    def __init__(self, plugin_id: str, operation: str) -> None:
        self._plugin_id, self._operation = plugin_id, operation
        self.active = _active(plugin_id)
        self.duration = invocation_duration.labels(plugin_id, operation)
        self.time_to_first_event = time_to_first_event.labels(plugin_id)
        self.messages = messages_relayed.labels(plugin_id)
        self.bytes_in = bytes_relayed.labels(plugin_id, "in")
        self.bytes_out = bytes_relayed.labels(plugin_id, "out")
        self.buffer_peak = session_buffer_peak.labels(plugin_id)
        self.terminations = {r: session_terminations.labels(plugin_id, r) for r in TERMINATIONS}
        self._ended: dict[str, Any] = {}

    def ended(self, outcome: str) -> Any:
        """The ``plugin_invocations_total`` child for ``outcome`` (a label from :func:`outcome_label`)."""
        child = self._ended.get(outcome)
        if child is None:
            child = self._ended[outcome] = invocations_total.labels(self._plugin_id, self._operation, outcome)
        return child

    def record(self, record: SessionRecord) -> None:
        """Count an ended session (applied at the next scrape or flush)."""
        _pending.append((self, record))
        if len(_pending) >= FLUSH_EVERY:
            flush()


@functools.cache
def invocation_series(plugin_id: str, operation: str) -> InvocationSeries:
    """Bounded: plugin ids come from the plugins directory, operations from the routes."""
    return InvocationSeries(plugin_id, operation)


class ValidationSeries:
    """One validator design's series, resolved once (see :class:`InvocationSeries`)."""

    def __init__(self, design: str) -> None:
        self.duration = validation_duration.labels(design)
        self.passed = validations_total.labels(design, "pass")
        self.failed = validations_total.labels(design, "fail")
        self.crashed = validations_total.labels(design, "crash")


@functools.cache
def validation_series(design: str) -> ValidationSeries:
    return ValidationSeries(design)


class RuntimeCollector(Collector):
    """Per-instance state read at scrape time, so it costs nothing between scrapes."""

    def __init__(self, instances: Callable[[], Iterable[tuple[str, int, bool, bool, int]]]) -> None:
        self._instances = instances

    def collect(self) -> Iterable[Any]:
        up = GaugeMetricFamily(
            "plugin_instance_up", "1 while the instance process runs.", labels=["plugin_id", "instance"]
        )
        ready = GaugeMetricFamily(
            "plugin_instance_ready",
            "1 while the instance takes invocations.",
            labels=["plugin_id", "instance"],
        )
        buffered = GaugeMetricFamily(
            "plugin_session_buffer_bytes",
            "Bytes queued for callers across the instance's open sessions.",
            labels=["plugin_id", "instance"],
        )
        for plugin_id, index, is_up, is_ready, queued in self._instances():
            labels = [plugin_id, str(index)]
            up.add_metric(labels, 1.0 if is_up else 0.0)
            ready.add_metric(labels, 1.0 if is_ready else 0.0)
            buffered.add_metric(labels, float(queued))
        yield from (up, ready, buffered)
