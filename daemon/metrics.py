"""Prometheus metrics, served on ``/metrics``.

The first three names match upstream Dify's plugin daemon, so existing
dashboards keep working; the rest are ours. Label values are bounded: plugin ids,
instance slots, validator designs and a fixed set of outcomes (a plugin's own
error types all count as ``plugin_error``).
"""

from __future__ import annotations

import bisect
import collections
import functools
import math
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any, NamedTuple

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    PlatformCollector,
    ProcessCollector,
    disable_created_metrics,
)
from prometheus_client.core import GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector
from prometheus_client.samples import Exemplar
from prometheus_client.utils import floatToGoString

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
VERDICTS = ("pass", "fail", "crash")  # of an output validation


def outcome_label(outcome: str) -> str:
    return OUTCOMES.get(outcome, "plugin_error")


class BatchHistogram(Collector):
    """A labelled histogram whose observations are applied in batches, without a lock each.

    ``prometheus_client``'s ``Histogram.observe`` takes a lock and walks the buckets, for
    every value; per session that was several of them on the loop. Here a batch of values
    (all sessions since the last flush) is counted with :func:`bisect.bisect_left` into plain
    lists, on whichever thread flushes, under one lock; a scrape reads the counts. The
    series are exposed exactly as ``Histogram`` exposes them (``_bucket`` with ``le``,
    ``_count``, ``_sum``, an exemplar per bucket in OpenMetrics).
    """

    def __init__(
        self, name: str, documentation: str, labelnames: list[str], buckets: tuple[float, ...], registry: Any
    ) -> None:
        self.name = name
        self.documentation = documentation
        self.labelnames = labelnames
        self.bounds = [float(b) for b in buckets]
        self._bucket_names = [floatToGoString(b) for b in (*self.bounds, math.inf)]
        self._series: dict[tuple[str, ...], _HistogramCounts] = {}
        self._lock = threading.Lock()
        registry.register(self)

    def labels(self, *values: str) -> _HistogramCounts:
        """The series of these label values, created (at zero) on first use."""
        counts = self._series.get(values)
        if counts is None:
            with self._lock:
                counts = self._series.setdefault(values, _HistogramCounts(self, len(self.bounds) + 1))
        return counts

    def describe(self) -> Iterable[Any]:
        return [HistogramMetricFamily(self.name, self.documentation, labels=self.labelnames)]

    def collect(self) -> Iterable[Any]:
        family = HistogramMetricFamily(self.name, self.documentation, labels=self.labelnames)
        with self._lock:
            series = [
                (labels, list(c.counts), c.total, list(c.exemplars)) for labels, c in self._series.items()
            ]
        for labels, counts, total, exemplars in series:
            buckets: list[Any] = []
            cumulative = 0
            for name, count, exemplar in zip(self._bucket_names, counts, exemplars, strict=True):
                cumulative += count
                buckets.append((name, cumulative, exemplar) if exemplar is not None else (name, cumulative))
            family.add_metric(list(labels), buckets, total)
        return [family]


class _HistogramCounts:
    """One label set's bucket counts (not cumulative), sum and latest exemplar per bucket."""

    __slots__ = ("_histogram", "counts", "exemplars", "total")

    def __init__(self, histogram: BatchHistogram, size: int) -> None:
        self._histogram = histogram
        self.counts = [0] * size
        self.exemplars: list[Exemplar | None] = [None] * size
        self.total = 0.0

    def observe_many(self, values: list[float], exemplars: list[dict[str, str] | None] | None = None) -> None:
        bounds = self._histogram.bounds
        positions = [bisect.bisect_left(bounds, value) for value in values]
        with self._histogram._lock:
            counts = self.counts
            for position in positions:
                counts[position] += 1
            self.total += sum(values)
            if exemplars is not None:
                latest = {}  # a bucket keeps its last exemplar: only that one is made
                for position, value, labels in zip(positions, values, exemplars, strict=True):
                    if labels is not None:
                        latest[position] = (labels, value)
                now = time.time()
                for position, (labels, value) in latest.items():
                    self.exemplars[position] = Exemplar(labels, value, now)


invocations_total = Counter(
    "plugin_invocations_total",
    "Invocations relayed, by plugin, operation and how they ended.",
    ["plugin_id", "operation", "status"],
    registry=REGISTRY,
)
invocation_duration = BatchHistogram(
    "plugin_invocation_duration_seconds",
    "From the request reaching a plugin instance to the last event sent.",
    ["plugin_id", "operation"],
    buckets=LATENCY_BUCKETS,
    registry=REGISTRY,
)
invocations_active = Gauge(
    "plugin_invocations_active", "Invocations in flight.", ["plugin_id"], registry=REGISTRY
)
time_to_first_event = BatchHistogram(
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
validation_duration = BatchHistogram(
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
session_buffer_peak = BatchHistogram(
    "plugin_session_buffer_peak_bytes",
    "The most bytes a session had queued for its caller at once.",
    ["plugin_id"],
    buckets=(0, 1024, 16384, 65536, 262144, 1048576, 4194304, 16777216),
    registry=REGISTRY,
)

for direction in ("decode", "encode"):
    serialization_seconds.labels(direction)
for design in ValidatorDesign:
    for verdict in VERDICTS:
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


class _Totals:
    """One series' sessions since the last flush: counts summed, observations listed."""

    __slots__ = (
        "buffer_peaks",
        "bytes_in",
        "bytes_out",
        "duration_exemplars",
        "durations",
        "encode_seconds",
        "first_event_exemplars",
        "first_events",
        "messages",
        "outcomes",
        "terminations",
    )

    def __init__(self) -> None:
        self.outcomes: collections.Counter[str] = collections.Counter()
        self.terminations: collections.Counter[str] = collections.Counter()
        self.messages = self.bytes_in = self.bytes_out = 0
        self.encode_seconds = 0.0
        self.durations: list[float] = []
        self.duration_exemplars: list[dict[str, str] | None] = []
        self.first_events: list[float] = []
        self.first_event_exemplars: list[dict[str, str] | None] = []
        self.buffer_peaks: list[float] = []

    def add(self, record: SessionRecord) -> None:
        self.outcomes[record.outcome] += 1
        self.messages += record.messages
        self.bytes_in += record.bytes_in
        self.bytes_out += record.bytes_out
        self.encode_seconds += record.encode_seconds
        if record.termination is not None:
            self.terminations[record.termination] += 1
        self.durations.append(record.duration)
        self.duration_exemplars.append(record.exemplar)
        if record.time_to_first_event is not None:
            self.first_events.append(record.time_to_first_event)
            self.first_event_exemplars.append(record.exemplar)
        self.buffer_peaks.append(record.buffer_peak)

    def apply(self, series: InvocationSeries) -> None:
        series.duration.observe_many(self.durations, self.duration_exemplars)
        if self.first_events:
            series.time_to_first_event.observe_many(self.first_events, self.first_event_exemplars)
        series.buffer_peak.observe_many(self.buffer_peaks)
        for outcome, count in self.outcomes.items():
            series.ended(outcome).inc(count)
        series.messages.inc(self.messages)
        series.bytes_in.inc(self.bytes_in)
        series.bytes_out.inc(self.bytes_out)
        _ENCODE_SECONDS.inc(self.encode_seconds)
        for reason, count in self.terminations.items():
            series.terminations[reason].inc(count)


def flush() -> None:
    """Apply the recorded sessions to their series (any thread; each record is applied once)."""
    _flush_validations()
    totals: dict[InvocationSeries, _Totals] = {}
    pop = _pending.popleft
    while True:
        try:
            series, record = pop()
        except IndexError:
            break
        total = totals.get(series)
        if total is None:
            total = totals[series] = _Totals()
        total.add(record)
    for series, total in totals.items():
        total.apply(series)


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
        self.verdicts = {verdict: validations_total.labels(design, verdict) for verdict in VERDICTS}

    def record(self, seconds: float, verdict: str) -> None:
        """Count one check (``pass``, ``fail`` or ``crash``), applied at the next scrape or flush."""
        _pending_validations.append((self, seconds, verdict))
        if len(_pending_validations) >= FLUSH_EVERY:
            flush()


_pending_validations: collections.deque[tuple[ValidationSeries, float, str]] = collections.deque()


def _flush_validations() -> None:
    checks: dict[ValidationSeries, tuple[list[float], collections.Counter[str]]] = {}
    pop = _pending_validations.popleft
    while True:
        try:
            series, seconds, verdict = pop()
        except IndexError:
            break
        batch = checks.get(series)
        if batch is None:  # (not setdefault: its default would be made for every check)
            batch = checks[series] = ([], collections.Counter())
        durations, verdicts = batch
        durations.append(seconds)
        verdicts[verdict] += 1
    for series, (durations, verdicts) in checks.items():
        series.duration.observe_many(durations)
        for verdict, count in verdicts.items():
            series.verdicts[verdict].inc(count)


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
