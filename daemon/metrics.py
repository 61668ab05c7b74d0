"""Prometheus metrics, served on ``/metrics``.

The first three names match upstream Dify's plugin daemon, so existing
dashboards keep working; the rest are ours. Label values are bounded: plugin ids,
instance slots, validator designs and a fixed set of outcomes (a plugin's own
error types all count as ``plugin_error``).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable
from typing import Any

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
REGISTRY = CollectorRegistry(auto_describe=True)
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
    invocations_active.labels(plugin_id)
    instance_restarts.labels(plugin_id)
    messages_relayed.labels(plugin_id)
    for direction in ("in", "out"):
        bytes_relayed.labels(plugin_id, direction)
    for reason in TERMINATIONS:
        session_terminations.labels(plugin_id, reason)


class InvocationSeries:
    """One plugin operation's series, resolved once.

    ``labels()`` takes a lock and checks its values on every call; the
    per-invocation path uses these children directly instead.
    """

    def __init__(self, plugin_id: str, operation: str) -> None:
        self._plugin_id, self._operation = plugin_id, operation
        self.active = invocations_active.labels(plugin_id)
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
