"""Spans recorded as plain values on the request path; OpenTelemetry SDK objects built off it.

The daemon's tracer implements the OpenTelemetry *API* (``trace.get_tracer``,
``start_as_current_span``, ``set_attribute``, ``set_status``, ...), so every call site
and the standard propagators work unchanged. What it does not do is run the SDK's
span machinery per span: measured on a 1-event invocation, the SDK's span objects
(attribute validation, locks, processors, the span context) were ~88% of the
+215 µs that tracing at 100% added. A span here is a slotted object holding ids,
two clock reads and its attributes (a dict as set one by one, or, as the daemon's own
call sites record them, a shared key set and a tuple of values: :meth:`LeanSpan.record`);
when it ends it is queued for the trace ring (which packs it, in a batch, into one
``bytes``: see :func:`pack`) and, only if an exporter is configured, for the exporter as
it is. The SDK's ``BatchSpanProcessor`` takes it from there on its own thread, where
:class:`ConvertingExporter` builds the ``ReadableSpan`` the exporter expects.

Sampling follows ``OTEL_TRACES_SAMPLER``: the configured sampler decides for a span
whose parent is not one of ours (a trace's local root); a child of a recorded span
is recorded, as with the default parent-based samplers. Samplers whose decision
depends on the parent alone are applied without being called (:func:`fixed_decision`).

Attribute values are bounded when the span is packed or exported (not as each is set,
on the request path): strings longer than the limit are truncated
(``OTEL_SPAN_ATTRIBUTE_VALUE_LENGTH_LIMIT`` / ``OTEL_ATTRIBUTE_VALUE_LENGTH_LIMIT``,
else :data:`DEFAULT_VALUE_LENGTH`), at most ``OTEL_SPAN_ATTRIBUTE_COUNT_LIMIT``
attributes are kept: a plugin's 1 MB error text is not kept per span.
"""

from __future__ import annotations

import logging
import os
import random
import threading
import time
import traceback
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager
from typing import Any

import orjson
from opentelemetry import context as context_api
from opentelemetry import propagate, trace
from opentelemetry.baggage import _BAGGAGE_KEY  # what baggage.get_all reads, read directly
from opentelemetry.context.contextvars_context import ContextVarsRuntimeContext
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import Event, ReadableSpan, SpanLimits, SpanProcessor
from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult
from opentelemetry.sdk.trace.sampling import ALWAYS_OFF, ALWAYS_ON, ParentBased, Sampler
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from opentelemetry.trace import (
    INVALID_SPAN,
    INVALID_SPAN_CONTEXT,
    NonRecordingSpan,
    SpanContext,
    SpanKind,
    Status,
    StatusCode,
    TraceFlags,
    TraceState,
)
from opentelemetry.trace.propagation import _SPAN_KEY  # what get_current_span reads, read directly
from opentelemetry.util import types

log = logging.getLogger(__name__)

DEFAULT_VALUE_LENGTH = 4096  # characters; the SDK's default is unbounded
_SAMPLED = TraceFlags(TraceFlags.SAMPLED)
_UNSAMPLED = TraceFlags(TraceFlags.DEFAULT)
_UNSET = Status(StatusCode.UNSET)
_getrandbits = random.getrandbits
_now = time.time_ns
# Attribute values the ring keeps as they are; None marks an attribute a key set names but
# the span did not have (see LeanSpan.record), dropped when the span is shown or exported.
_PLAIN_TYPES = frozenset((str, int, float, bool, type(None)))
_set_item = dict.__setitem__  # a Context refuses item assignment; a new one is filled this way

# What the trace ring keeps of a span: its fields encoded as one JSON array (orjson: a
# third of marshal's time for a span's dozen fields), a batch of them joined into one
# ``bytes`` per ring entry, because a kept span is freed long after it was made. Twenty
# thousand spans kept as tuples of numbers and strings are ~200,000 objects spread over
# megabytes: each span ended pushed the oldest out of the ring, and freeing its ten-odd
# objects, long out of the CPU's caches, cost more than recording the span. A ``bytes``
# is one block to free, holds no reference, and the garbage collector never looks at it.
# A span's fields, as :meth:`LeanSpan.plain` and :func:`pack` write them:
#   name, trace id (high, low 64 bits: JSON numbers of up to 64 bits), span id, parent id,
#   is_root, start ns, end ns, failed, status description, attribute keys, attribute values.
# The attribute keys of a span are stored as the index of their tuple in _KEY_SETS
# (one tuple per call site), or as the tuple itself once _MAX_KEY_SETS are known.
_KEY_SETS: list[tuple[str, ...]] = []
_KEY_INDEX: dict[tuple[str, ...], int] = {}
_MAX_KEY_SETS = 1024
_KEY_LOCK = threading.Lock()
LOW_64_BITS = (1 << 64) - 1  # a trace id is kept as its high and low 64 bits


def key_set(keys: tuple[str, ...]) -> int | tuple[str, ...]:
    """How a kept span names its attribute keys: an index in the shared sets, if it fits.

    New sets are registered under a lock: spans end on several threads (the SDK's, the
    reaping threads'), and two sets appended at once must not both take the last index.
    """
    index = _KEY_INDEX.get(keys)
    if index is not None:
        return index
    with _KEY_LOCK:
        index = _KEY_INDEX.get(keys)
        if index is not None:
            return index
        if len(_KEY_SETS) >= _MAX_KEY_SETS:
            return keys
        index = len(_KEY_SETS)
        _KEY_SETS.append(keys)  # before the index is published: a reader of one finds the set
        _KEY_INDEX[keys] = index
        return index


def pack(fields: Sequence[Any]) -> bytes:
    """A kept span's fields as one JSON array; a value JSON cannot carry as it is (another
    type, an integer past 64 bits, a string with a lone surrogate) is written as text."""
    try:
        return orjson.dumps(fields)
    except orjson.JSONEncodeError:
        return orjson.dumps(_plainly(fields))


def _plainly(value: Any) -> Any:
    if isinstance(value, (list, tuple)):
        return [_plainly(v) for v in value]
    if value is None or isinstance(value, (bool, float)):
        return value
    if isinstance(value, int) and -(1 << 63) <= value <= LOW_64_BITS:
        return int(value)
    return str(value).encode("utf-8", "replace").decode("utf-8")


def key_names(keys: int | Sequence[str]) -> Sequence[str]:
    """The attribute keys :func:`key_set` stands for."""
    return _KEY_SETS[keys] if type(keys) is int else keys


def unpack_entry(entry: bytes) -> list[list[Any]]:
    """The spans of a ring entry (``[`` + the spans' encodings joined by ``,`` + ``]``)."""
    return orjson.loads(entry)  # type: ignore[no-any-return]


def unpacked(fields: list[Any]) -> tuple[Any, ...]:
    """A kept span's fields with the trace id whole and the attributes as ``(key, value)``
    pairs sorted by key (a list value as a tuple, as it was set)."""
    name, high, low, *rest, keys, values = fields
    pairs = (
        (key, tuple(value) if type(value) is list else value)
        for key, value in zip(key_names(keys), values, strict=True)
        if value is not None
    )
    return (name, high << 64 | low, *rest, tuple(sorted(pairs)))


# What a recorded span is handed to when it ends: the trace ring, which packs it (see pack).
KeepFn = Callable[["LeanSpan"], None]


# The current context, read and set without the API's three layers of calls per access when
# the runtime context is the default one (a context variable): a span started cold, on a
# request's path, paid for each of those frames. Another runtime context (OTEL_PYTHON_CONTEXT)
# is used through the API.
_RUNTIME = getattr(context_api, "_RUNTIME_CONTEXT", None)
_CURRENT = _RUNTIME._current_context if type(_RUNTIME) is ContextVarsRuntimeContext else None
current_context: Callable[[], context_api.Context] = (
    _CURRENT.get if _CURRENT is not None else context_api.get_current  # type: ignore[assignment]
)


def attach(span: trace.Span) -> object:
    """Make ``span`` the current span, as ``context.attach(trace.set_span_in_context(span))``;
    returns the token for :func:`detach`."""
    if _CURRENT is None:
        return context_api.attach(trace.set_span_in_context(span))
    context = context_api.Context(_CURRENT.get())
    _set_item(context, _SPAN_KEY, span)
    return _CURRENT.set(context)


def detach(token: Any) -> None:
    """Restore the context :func:`attach` replaced, as ``context.detach`` (which logs, not
    raises, when the token belongs to another context)."""
    if _CURRENT is None:
        context_api.detach(token)
        return
    try:
        _CURRENT.reset(token)
    except (ValueError, RuntimeError):
        log.exception("Failed to detach context")


def in_context(span: trace.Span) -> context_api.Context:
    """A context holding ``span`` as its current span, as ``trace.set_span_in_context``."""
    context = context_api.Context(current_context())
    _set_item(context, _SPAN_KEY, span)
    return context


# Decides for a trace's local root from its parent's span context (invalid when there is none).
Decide = Callable[[SpanContext], bool]


def _static(sampler: Any) -> bool | None:
    return True if sampler is ALWAYS_ON else False if sampler is ALWAYS_OFF else None


def fixed_decision(sampler: Sampler) -> Decide | None:
    """The sampler's decision as a function of the parent alone, when that is all it reads.

    ``always_on``, ``always_off`` and the ``parentbased_*`` samplers built on them (the
    SDK's default is ``parentbased_always_on``) decide from the parent's sampled flag and
    whether it is remote; asking them builds a ``SamplingResult`` per root span. Any other
    sampler (ratio-based, or configured from an entry point) returns None and is asked.
    """
    decision = _static(sampler)
    if decision is not None:
        return lambda parent: decision
    if type(sampler) is not ParentBased:
        return None
    delegates = [
        _static(getattr(sampler, name, None))
        for name in (
            "_root",
            "_remote_parent_sampled",
            "_remote_parent_not_sampled",
            "_local_parent_sampled",
            "_local_parent_not_sampled",
        )
    ]
    if None in delegates:
        return None
    root, remote_sampled, remote_unsampled, local_sampled, local_unsampled = delegates

    def parent_based(parent: SpanContext) -> bool:
        if not parent.is_valid:
            return bool(root)
        if parent.is_remote:
            return bool(remote_sampled if parent.trace_flags.sampled else remote_unsampled)
        return bool(local_sampled if parent.trace_flags.sampled else local_unsampled)

    return parent_based


class Limits:
    """Attribute bounds, from the standard ``OTEL_*`` limits with a bounded default length."""

    def __init__(self) -> None:
        sdk = SpanLimits()
        self.value_length: int = sdk.max_span_attribute_length or DEFAULT_VALUE_LENGTH
        self.count: int = sdk.max_span_attributes or 128


def _bounded(value: Any, limit: int) -> Any:
    """The value as an exporter accepts it, strings cut to ``limit``; None if not a valid value."""
    if isinstance(value, str):
        return value if type(value) is str and len(value) <= limit else str(value)[:limit]
    for kind in (bool, int, float):  # bool first: it is an int
        if isinstance(value, kind):
            return kind(value)
    if isinstance(value, (list, tuple)):
        items = tuple(_bounded(v, limit) for v in value if not isinstance(v, (list, tuple)))
        return items if len(items) == len(value) and None not in items else None
    return None


class LeanSpan(trace.Span):
    """A recording span: ids, times and attributes; nothing else until it is exported."""

    __slots__ = (
        "_bounded",
        "_context",
        "_hex",
        "_tracer",
        "attributes",
        "end_ns",
        "events",
        "keys",
        "kind",
        "name",
        "parent_id",
        "parent_remote",
        "span_id",
        "start_ns",
        "status_code",
        "status_description",
        "trace_id",
        "trace_state",
        "values",
    )

    def __init__(
        self,
        tracer: LeanTracer,
        name: str,
        trace_id: int,
        parent_id: int | None,
        parent_remote: bool,
        trace_state: TraceState | None,
        kind: SpanKind,
        attributes: types.Attributes,
        start_ns: int | None,
    ) -> None:
        self._tracer = tracer
        self.name = name
        self.trace_id = trace_id
        self.span_id = _getrandbits(64) or 1
        self.parent_id = parent_id
        self.parent_remote = parent_remote
        self.trace_state = trace_state
        self.kind = kind
        self.start_ns = start_ns or _now()
        self.end_ns = 0
        self.attributes: dict[str, Any] | None = dict(attributes) if attributes else None  # as set
        self.keys: int | tuple[str, ...] | None = None  # and as recorded: see record
        self.values: tuple[Any, ...] = ()
        self._bounded: dict[str, Any] | None = None
        self._hex: str | None = None
        self.status_code = StatusCode.UNSET
        self.status_description = ""
        self.events: list[Event] | None = None
        self._context: SpanContext | None = None

    # -- the OpenTelemetry Span API ------------------------------------------------------------

    def get_span_context(self) -> SpanContext:
        if self._context is None:
            self._context = SpanContext(
                self.trace_id, self.span_id, False, _SAMPLED, self.trace_state or TraceState()
            )
        return self._context

    context = property(get_span_context)  # what the SDK's span processors read

    def is_recording(self) -> bool:
        return self.end_ns == 0

    def trace_hex(self) -> str:
        """The trace id as 32 hex digits (traceparent, exemplars), formatted once."""
        if self._hex is None:
            self._hex = format(self.trace_id, "032x")
        return self._hex

    def set_attribute(self, key: str, value: types.AttributeValue) -> None:
        if self.attributes is None:  # bounded later, as set_attributes
            self.attributes = {key: value}
        else:
            self.attributes[key] = value

    def set_attributes(self, attributes: Mapping[str, types.AttributeValue]) -> None:
        """Taken as given; bounded once the span has ended (:meth:`bounded_attributes`)."""
        if self.attributes is None:
            self.attributes = dict(attributes)
        else:
            self.attributes.update(attributes)

    def record(self, keys: int | tuple[str, ...], values: tuple[Any, ...]) -> None:
        """Attributes as a key set (:func:`key_set`, made once per call site) and a tuple of
        values, None for an attribute the span does not have: how the daemon's own call
        sites set a span's attributes, once, without building a dict per request. Values
        are strings, numbers, booleans or None (the trace ring keeps them without checking
        their types; an exporter gets them bounded and checked). They
        become ``(key, value)`` pairs when the span is shown or exported; attributes set
        one by one take precedence over them."""
        if self.keys is not None:  # recorded before: keep those as attributes set one by one
            self.attributes = self.all_attributes()
        self.keys = keys
        self.values = values

    def all_attributes(self) -> dict[str, Any]:
        """The attributes as set and as recorded, unbounded."""
        attributes = self.attributes or {}
        if self.keys is None:
            return attributes
        pairs = zip(key_names(self.keys), self.values, strict=True)
        merged = {key: value for key, value in pairs if value is not None}
        merged.update(attributes)
        return merged

    def bounded_attributes(self) -> dict[str, Any]:
        """The attributes within the limits: strings cut to the value length, invalid values
        dropped, at most ``count`` of them (the first set). Computed when the span is packed
        or exported, in a batch off the request path, rather than as each is set."""
        if self._bounded is not None:
            return self._bounded
        limits = self._tracer.limits
        length, count = limits.value_length, limits.count
        kept: dict[str, Any] = {}
        for key, value in self.all_attributes().items():
            kind = type(value)
            if kind is str:
                if len(value) > length:
                    value = value[:length]
            elif kind is not int and kind is not float and kind is not bool:
                value = _bounded(value, length)
                if value is None:
                    log.debug("span attribute %s dropped: %s is not a valid value", key, kind.__name__)
                    continue
            if len(kept) >= count:
                break
            kept[key] = value
        self._bounded = kept
        return kept

    def add_event(self, name: str, attributes: types.Attributes = None, timestamp: int | None = None) -> None:
        limit = self._tracer.limits.value_length
        bounded = {k: b for k, v in (attributes or {}).items() if (b := _bounded(v, limit)) is not None}
        if self.events is None:
            self.events = []
        if len(self.events) < self._tracer.limits.count:
            self.events.append(Event(name[:limit], bounded, timestamp or _now()))

    def update_name(self, name: str) -> None:
        self.name = name

    def set_status(self, status: Status | StatusCode, description: str | None = None) -> None:
        if isinstance(status, Status):
            code, description = status.status_code, status.description
        else:
            code = status
        if code is StatusCode.UNSET:
            return
        self.status_code = code
        text = description or "" if code is StatusCode.ERROR else ""
        self.status_description = text[: self._tracer.limits.value_length]

    def record_exception(
        self,
        exception: BaseException,
        attributes: types.Attributes = None,
        timestamp: int | None = None,
        escaped: bool = False,
    ) -> None:
        event = {
            "exception.type": type(exception).__qualname__,
            "exception.message": str(exception),
            "exception.stacktrace": "".join(traceback.format_exception(exception)),
            "exception.escaped": str(escaped),
        }
        self.add_event("exception", {**event, **(attributes or {})}, timestamp)

    def end(self, end_time: int | None = None) -> None:
        if self.end_ns:
            return
        self.end_ns = end_time or _now()
        for ended in self._tracer.ended:
            ended(self)

    def __enter__(self) -> LeanSpan:
        return self

    def __exit__(self, kind: Any, exc: BaseException | None, tb: Any) -> None:
        """``with span:`` ends it, as :func:`ending` does: an exception is recorded and,
        unless a status was set, makes the span's status an error."""
        if isinstance(exc, Exception) and not self.end_ns:
            self.record_exception(exc)
            if self.status_code is StatusCode.UNSET:
                self.set_status(StatusCode.ERROR, f"{type(exc).__name__}: {exc}")
        self.end()

    # -- what the ring and the exporter take ---------------------------------------------------

    def plain(self) -> bytes:
        """What the trace ring keeps of this span (see :func:`pack`); formatting (the trace
        id in hex, attributes sorted) waits until the trace page asks.

        Bounding the attributes one by one (:meth:`bounded_attributes`) was a third of what
        keeping a span cost. Usually nothing needs it: when every value is a string, number,
        boolean or None (as recorded values are: :meth:`record`) and the whole encoding is
        no longer than the value limit, no string in it can be longer either; only otherwise
        (or when the span has attributes both set and recorded) are the attributes bounded
        and packed again.
        """
        attributes = self.attributes
        keys: int | tuple[str, ...] | None = self.keys
        values: tuple[Any, ...] | None
        plain = True  # every value is of a type kept as it is
        if keys is None:
            attributes = attributes or {}
            values = tuple(attributes.values())
            keys = key_set(tuple(attributes))
            plain = _PLAIN_TYPES.issuperset(map(type, values))
        elif attributes:  # both set and recorded: merged, and bounded, below
            values = None
        else:
            values = self.values
        limits = self._tracer.limits
        trace_id, parent_id = self.trace_id, self.parent_id
        fields = [
            self.name,
            trace_id >> 64,
            trace_id & LOW_64_BITS,
            self.span_id,
            parent_id,
            parent_id is None or self.parent_remote,
            self.start_ns,
            self.end_ns,
            self.status_code is StatusCode.ERROR,
            self.status_description,
            keys,
            values,
        ]
        if plain and values is not None and len(values) <= limits.count:
            try:
                blob = orjson.dumps(fields)
            except orjson.JSONEncodeError:  # an integer past 64 bits, a lone surrogate
                pass
            else:
                if len(blob) <= limits.value_length:
                    return blob
        attributes = self.bounded_attributes()
        fields[-2:] = key_set(tuple(attributes)), tuple(attributes.values())
        return pack(fields)

    def readable(self) -> ReadableSpan:
        """The SDK's span for an exporter; built on the batch processor's thread."""
        parent = None
        if self.parent_id is not None:
            parent = SpanContext(
                self.trace_id, self.parent_id, self.parent_remote, _SAMPLED, self.trace_state or TraceState()
            )
        return ReadableSpan(
            name=self.name,
            context=self.get_span_context(),
            parent=parent,
            resource=self._tracer.provider.resource,
            attributes=self.bounded_attributes(),
            events=self.events or (),
            kind=self.kind,
            status=Status(self.status_code, self.status_description or None)
            if self.status_code is not StatusCode.UNSET
            else _UNSET,
            start_time=self.start_ns,
            end_time=self.end_ns,
            instrumentation_scope=self._tracer.scope,
        )


def record(span: trace.Span, keys: int | tuple[str, ...], values: tuple[Any, ...]) -> None:
    """:meth:`LeanSpan.record` on a lean span; on another, its ``set_attributes`` with the values
    that are not None."""
    if type(span) is LeanSpan:
        span.record(keys, values)
    else:
        span.set_attributes({k: v for k, v in zip(key_names(keys), values, strict=True) if v is not None})


class _Current:
    """``start_as_current_span``'s context manager, as a class: cheaper than a generator."""

    __slots__ = ("_attach", "_context", "_end_on_exit", "_record", "_set_status", "_span", "_token")

    def __init__(
        self, span: trace.Span, context: context_api.Context | None, end: bool, record: bool, status: bool
    ) -> None:
        self._span = span
        self._context = context
        self._end_on_exit = end
        self._record = record
        self._set_status = status
        self._attach = True

    def __enter__(self) -> trace.Span:
        if self._attach:
            if self._context is None:
                self._token = attach(self._span)
            else:
                self._token = context_api.attach(trace.set_span_in_context(self._span, self._context))
        return self._span

    def __exit__(self, kind: Any, exc: BaseException | None, tb: Any) -> None:
        if self._attach:
            detach(self._token)
        span = self._span
        if isinstance(exc, Exception) and span.is_recording():
            if self._record:
                span.record_exception(exc)
            if self._set_status and (not isinstance(span, LeanSpan) or span.status_code is StatusCode.UNSET):
                span.set_status(StatusCode.ERROR, f"{type(exc).__name__}: {exc}")
        if self._end_on_exit:
            span.end()


def _default_propagators() -> bool:
    """Whether ``OTEL_PROPAGATORS`` names the API's default: W3C trace context and baggage."""
    names = os.environ.get("OTEL_PROPAGATORS", "tracecontext,baggage").replace(" ", "").lower()
    return names in ("tracecontext,baggage", "baggage,tracecontext", "tracecontext")


def inject(carrier: dict[str, str], span: trace.Span) -> None:
    """Write ``span``'s trace context into ``carrier``, as ``propagate.inject`` does.

    With the default propagators and no baggage in the current context, the
    ``traceparent`` (and ``tracestate``) header is written directly: the generic pass
    through both propagators measured ~3x the cost of starting and ending a span.
    """
    if (
        type(span) is not LeanSpan
        or not span._tracer.provider.default_propagators
        or current_context().get(_BAGGAGE_KEY)
    ):
        propagate.inject(carrier, context=trace.set_span_in_context(span))
        return
    carrier["traceparent"] = f"00-{span.trace_hex()}-{span.span_id:016x}-01"
    if span.trace_state:
        carrier["tracestate"] = span.trace_state.to_header()


class Tracer:
    """A module's tracer, looked up in the global provider at first use after one is installed.

    ``trace.get_tracer`` at import time returns the API's ``ProxyTracer``, whose
    ``start_as_current_span`` wraps the real one in a generator-based context manager
    on every call (~25 µs a span measured here); this forwards to the lean tracer as it is.
    """

    def __init__(self, name: str) -> None:
        self.name = name
        self._tracer: trace.Tracer | None = None

    def _resolve(self) -> trace.Tracer:
        provider = trace.get_tracer_provider()
        tracer = provider.get_tracer(self.name)
        if isinstance(provider, LeanTracerProvider):
            self._tracer = tracer
            # From now on a call goes straight to the lean tracer, without this forwarding frame.
            self.start_span = tracer.start_span  # type: ignore[method-assign]
            self.start_as_current_span = tracer.start_as_current_span  # type: ignore[method-assign]
        return tracer

    def start_span(self, name: str, context: context_api.Context | None = None, **options: Any) -> trace.Span:
        return (self._tracer or self._resolve()).start_span(name, context, **options)

    def start_as_current_span(
        self, name: str, context: context_api.Context | None = None, **options: Any
    ) -> AbstractContextManager[trace.Span]:
        return (self._tracer or self._resolve()).start_as_current_span(name, context, **options)


class LeanTracer(trace.Tracer):
    def __init__(self, provider: LeanTracerProvider, scope: InstrumentationScope) -> None:
        self.provider = provider
        self.scope = scope
        self.limits = provider.limits
        self.ended = provider.ended

    def start_span(
        self,
        name: str,
        context: context_api.Context | None = None,
        kind: SpanKind = SpanKind.INTERNAL,
        attributes: types.Attributes = None,
        links: Any = None,
        start_time: int | None = None,
        record_exception: bool = True,
        set_status_on_exception: bool = True,
    ) -> trace.Span:
        parent = (current_context() if context is None else context).get(_SPAN_KEY, INVALID_SPAN)
        if type(parent) is LeanSpan:  # a child of a recorded span of ours: recorded too
            return LeanSpan(
                self,
                name,
                parent.trace_id,
                parent.span_id,
                False,
                parent.trace_state,
                kind,
                attributes,
                start_time,
            )
        if parent is INVALID_SPAN and self.provider.root is not None:  # a new trace, decided alike
            trace_id = _getrandbits(128) or 1
            if not self.provider.root:
                return NonRecordingSpan(SpanContext(trace_id, _getrandbits(64) or 1, False, _UNSAMPLED))
            return LeanSpan(self, name, trace_id, None, False, None, kind, attributes, start_time)
        parent_context = parent.get_span_context()
        if parent_context.is_valid:
            trace_id, parent_id = parent_context.trace_id, parent_context.span_id
        else:
            trace_id, parent_id = _getrandbits(128) or 1, None
        decide = self.provider.decide
        if decide is not None:
            sampled = decide(parent_context)
        else:
            sampled = self.provider.sampler.should_sample(
                context, trace_id, name, kind, attributes, links
            ).decision.is_sampled()
        state = parent_context.trace_state if parent_id is not None else None
        if not sampled:
            return NonRecordingSpan(SpanContext(trace_id, _getrandbits(64) or 1, False, _UNSAMPLED, state))
        return LeanSpan(
            self,
            name,
            trace_id,
            parent_id,
            parent_context.is_remote,
            state or None,
            kind,
            attributes,
            start_time,
        )

    def start_as_current_span(  # type: ignore[override]
        self,
        name: str,
        context: context_api.Context | None = None,
        kind: SpanKind = SpanKind.INTERNAL,
        attributes: types.Attributes = None,
        links: Any = None,
        start_time: int | None = None,
        record_exception: bool = True,
        set_status_on_exception: bool = True,
        end_on_exit: bool = True,
    ) -> Iterator[trace.Span]:
        span = self.start_span(name, context, kind, attributes, links, start_time)
        return _Current(span, None, end_on_exit, record_exception, set_status_on_exception)  # type: ignore[return-value]


class LeanTracerProvider(trace.TracerProvider):
    """The daemon's tracer provider: the SDK's sampler, resource and limits, lean spans.

    ``keep`` receives each ended span (the trace ring, which packs it); every
    processor in ``processors`` (the SDK's batch processors) receives the span
    itself, and with it builds its ``ReadableSpan`` off the request path.
    """

    def __init__(
        self,
        resource: Resource,
        sampler: Sampler,
        keep: KeepFn | None,
        processors: Sequence[SpanProcessor] = (),
    ) -> None:
        self.resource = resource
        self.sampler = sampler
        self.decide = fixed_decision(sampler)
        self.root = self.decide(INVALID_SPAN_CONTEXT) if self.decide is not None else None  # a new trace's
        self.limits = Limits()
        self.default_propagators = _default_propagators()
        self.processors = list(processors)
        self.keep = keep
        # What an ended span is handed to: the ring, then each processor.
        self.ended: tuple[Callable[[LeanSpan], None], ...] = (
            *(() if keep is None else (keep,)),
            *(processor.on_end for processor in self.processors),  # type: ignore[misc]
        )
        self._tracers: dict[str, LeanTracer] = {}
        self._lock = threading.Lock()

    def get_tracer(
        self,
        instrumenting_module_name: str,
        instrumenting_library_version: str | None = None,
        schema_url: str | None = None,
        attributes: types.Attributes = None,
    ) -> LeanTracer:
        with self._lock:
            tracer = self._tracers.get(instrumenting_module_name)
            if tracer is None:
                scope = InstrumentationScope(
                    instrumenting_module_name, instrumenting_library_version, schema_url
                )
                tracer = self._tracers[instrumenting_module_name] = LeanTracer(self, scope)
            return tracer

    def shutdown(self) -> None:
        for processor in self.processors:
            processor.shutdown()


class ConvertingExporter(SpanExporter):
    """Wraps an SDK exporter: turns the lean spans a batch holds into ``ReadableSpan``."""

    def __init__(self, exporter: SpanExporter) -> None:
        self.exporter = exporter

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        readable = [s.readable() if isinstance(s, LeanSpan) else s for s in spans]
        return self.exporter.export(readable)

    def shutdown(self) -> None:
        self.exporter.shutdown()

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return self.exporter.force_flush(timeout_millis)
