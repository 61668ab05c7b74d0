"""Tracing: the OpenTelemetry set-up, and the in-memory ring behind ``/debug/traces``.

Exporters follow the standard environment variables: ``OTEL_TRACES_EXPORTER``
(``otlp``, ``console``, ``none``; a comma-separated list), ``OTEL_EXPORTER_OTLP_*``
(endpoint, headers, ``OTEL_EXPORTER_OTLP_PROTOCOL`` = ``http/protobuf`` or ``grpc``),
``OTEL_TRACES_SAMPLER``/``OTEL_TRACES_SAMPLER_ARG``, ``OTEL_SERVICE_NAME`` and
``OTEL_RESOURCE_ATTRIBUTES``. Without an exporter configured, spans still go to a
bounded ring so the built-in trace page works with no extra software.
``OTEL_SDK_DISABLED=true`` turns tracing off: no provider is installed and every
span is the API's no-op.

Spans are per task, never per message: the session span carries message and byte
counts and the decode/encode time accumulated over the whole session.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from collections import deque
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from typing import Any, NamedTuple

from opentelemetry import propagate, trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter, SpanExporter
from opentelemetry.trace import Span, SpanKind, Status, StatusCode
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from daemon.errors import unwrap
from daemon.spans import (
    LOW_64_BITS,
    ConvertingExporter,
    LeanSpan,
    LeanTracerProvider,
    Tracer,
    attach,
    detach,
    key_set,
    pack,
    record,
    unpack_entry,
    unpacked,
)

log = logging.getLogger(__name__)

DEFAULT_RING_BYTES = 64 * 1024 * 1024


class KeptSpan(NamedTuple):
    """An ended span as the trace page needs it, made of plain values."""

    name: str
    trace_id: str  # 32 hex digits
    span_id: int
    parent_id: int | None
    is_root: bool  # no parent, or a parent in another process
    start_ns: int
    end_ns: int
    failed: bool
    status: str  # the status description, "" when none
    attributes: tuple[tuple[str, Any], ...]  # sorted by key

    @property
    def duration(self) -> float:
        """Seconds."""
        return (self.end_ns - self.start_ns) / 1e9


def _plain(span: ReadableSpan) -> bytes:
    """A span the SDK made, as the ring keeps it (see :func:`daemon.spans.pack`)."""
    context, parent = span.context, span.parent
    attributes = span.attributes or {}
    trace_id = context.trace_id if context else 0
    return pack(
        (
            span.name,
            trace_id >> 64,
            trace_id & LOW_64_BITS,
            context.span_id if context else 0,
            parent.span_id if parent else None,
            parent is None or parent.is_remote,
            span.start_time or 0,
            span.end_time or 0,
            span.status.status_code is StatusCode.ERROR,
            span.status.description or "",
            key_set(tuple(attributes)),
            tuple(attributes.values()),
        )
    )


def _kept(fields: list[Any]) -> KeptSpan:
    """The trace page's view of a kept span: formatted when the page asks, not per request."""
    name, trace_id, *rest = unpacked(fields)
    return KeptSpan(name, format(trace_id, "032x"), *rest)


# What an entry costs the ring beyond its encoding: the bytes object and its deque slots.
ENTRY_OVERHEAD = 64
BATCH = 64  # ended spans packed into the ring at a time
ENTRY_SHARE = 16  # an entry holds at most about 1/16 of the ring's byte budget


class SpanRing(SpanProcessor):
    """The most recent ended spans, bounded in count and in bytes; read by the trace page.

    Spans are packed a batch at a time (:data:`BATCH`), each encoded as a JSON array
    (:func:`daemon.spans.pack`), a batch's joined into one entry: a ``bytes`` the
    cyclic garbage collector never walks and which is one block to free when its
    spans leave the ring. A ``ReadableSpan`` is eleven objects the collector must walk;
    twenty thousand of them alive made the daemon's full collections long: with tracing
    on, time-to-first-event p99 was 57 / 198 ms instead of 14 / 18 ms (bench/HISTORY.md).
    Tuples of numbers and strings, which the collector stops tracking, still cost more
    to free, cold, than the span cost to record; so did a ``bytes`` per span. The count
    bound is exact as the trace page sees it (older spans of the oldest entry are not
    shown); the byte bound (the encoded size) drops whole entries, which are kept small
    against it (:data:`ENTRY_SHARE`), and keeps a ring of spans with long attribute
    values, each already truncated, from growing without limit.
    """

    def __init__(self, capacity: int, max_bytes: int = DEFAULT_RING_BYTES) -> None:
        self.capacity = capacity
        self.max_bytes = max_bytes
        self.bytes = 0
        self.kept = 0  # spans in the entries
        self._entries: deque[bytes] = deque()
        self._counts: deque[int] = deque()  # spans per entry
        self._pending: deque[LeanSpan | bytes] = deque()
        self._lock = threading.Lock()

    def keep(self, span: LeanSpan) -> None:
        """Keep an ended lean span: queued as it is, packed with the next :data:`BATCH`.

        Packing a span on its own, with the rest of a request's work in the CPU's caches
        in between, measured several times what it costs in a loop over a batch; the
        queue is drained on any thread that fills it and before every snapshot.
        """
        pending = self._pending
        pending.append(span)
        if len(pending) >= BATCH:
            self._drain()

    def _drain(self) -> None:
        pending = self._pending
        share = self.max_bytes // ENTRY_SHARE
        with self._lock:  # drainers hold it, so what len() counts is there to take
            take = pending.popleft
            blobs = [
                span if type(span) is bytes else span.plain()  # type: ignore[union-attr]
                for span in [take() for _ in range(len(pending))]
            ]
            if not blobs:
                return
            if sum(map(len, blobs)) < share:
                self._keep_entry(blobs)
                return
            entry: list[bytes] = []  # spans with long values: entries of about ``share`` bytes
            size = 0
            for blob in blobs:
                entry.append(blob)
                size += len(blob)
                if size >= share:
                    self._keep_entry(entry)
                    entry, size = [], 0
            if entry:
                self._keep_entry(entry)

    def _keep_entry(self, blobs: list[bytes]) -> None:
        entry = b"[%s]" % b",".join(blobs)  # one JSON array of the spans' arrays
        entries, counts = self._entries, self._counts
        entries.append(entry)
        counts.append(len(blobs))
        self.kept += len(blobs)
        self.bytes += len(entry) + ENTRY_OVERHEAD
        while self.kept - counts[0] >= self.capacity or (self.bytes > self.max_bytes and len(entries) > 1):
            self.kept -= counts.popleft()
            self.bytes -= len(entries.popleft()) + ENTRY_OVERHEAD

    def on_end(self, span: ReadableSpan) -> None:
        """A span the SDK made (when the SDK's provider is used instead of the lean one)."""
        self._pending.append(_plain(span))
        if len(self._pending) >= BATCH:
            self._drain()

    def snapshot(self) -> list[KeptSpan]:
        self._drain()
        with self._lock:
            entries = list(self._entries)
            hidden = self.kept - self.capacity  # the oldest entry's spans beyond the count
        kept = [fields for entry in entries for fields in unpack_entry(entry)]
        return [_kept(fields) for fields in kept[max(hidden, 0) :]]

    def shutdown(self) -> None:
        pass

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return True


def tracing_disabled() -> bool:
    return os.environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true"


def _otlp_configured() -> bool:
    return any(
        os.environ.get(name) for name in ("OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
    )


def exporters_from_env() -> list[SpanExporter]:
    names = os.environ.get("OTEL_TRACES_EXPORTER") or ("otlp" if _otlp_configured() else "none")
    exporters: list[SpanExporter] = []
    for name in (n.strip().lower() for n in names.split(",") if n.strip()):
        if name == "otlp":
            protocol = (
                os.environ.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL")
                or os.environ.get("OTEL_EXPORTER_OTLP_PROTOCOL")
                or "http/protobuf"
            )
            if protocol == "grpc":
                from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
            elif protocol == "http/protobuf":
                from opentelemetry.exporter.otlp.proto.http.trace_exporter import (  # type: ignore[assignment]
                    OTLPSpanExporter,
                )
            else:
                raise ValueError(f"unsupported OTLP protocol {protocol!r} (use http/protobuf or grpc)")
            exporters.append(OTLPSpanExporter())
        elif name == "console":
            exporters.append(ConsoleSpanExporter())
        elif name != "none":
            raise ValueError(f"unsupported OTEL_TRACES_EXPORTER {name!r} (use otlp, console or none)")
    return exporters


class Tracing:
    """What the daemon installed: a provider (None when disabled) and the ring."""

    def __init__(self, provider: LeanTracerProvider | None, ring: SpanRing | None) -> None:
        self.provider = provider
        self.ring = ring
        self.enabled = provider is not None  # read per invocation: an attribute, not a property

    def shutdown(self) -> None:
        if self.provider is not None:
            self.provider.shutdown()


def setup_tracing(
    ring_capacity: int,
    exporters: Sequence[SpanExporter] | None = None,
    ring_bytes: int = DEFAULT_RING_BYTES,
) -> Tracing:
    if tracing_disabled():
        log.info("tracing disabled (OTEL_SDK_DISABLED=true)")
        return Tracing(None, None)
    resource = Resource.create({"service.name": os.environ.get("OTEL_SERVICE_NAME") or "plugin-daemon"})
    # The SDK's provider reads OTEL_TRACES_SAMPLER(_ARG); its sampler decides for ours.
    sampler = TracerProvider(resource=resource, shutdown_on_exit=False).sampler
    ring = SpanRing(ring_capacity, ring_bytes) if ring_capacity > 0 else None
    processors = []
    for exporter in exporters_from_env() if exporters is None else exporters:
        processors.append(BatchSpanProcessor(ConvertingExporter(exporter)))
        log.info("exporting spans with %s", type(exporter).__name__)
    provider = LeanTracerProvider(resource, sampler, ring.keep if ring is not None else None, processors)
    trace.set_tracer_provider(provider)
    return Tracing(provider, ring)


# Readiness polls, scrapes and health checks: hundreds an hour, each would push an invocation off
# the trace page. TRACE_UNTRACED_PATHS replaces this list; the debug pages are never traced.
POLLING_PATHS = ("/plugins", "/health/check", "/metrics")
# How every final error event of a stream starts (daemon.wire.sse_error): what the caller saw.
_SSE_ERROR = b'data: {"code":-'


def _stream_error(event: bytes) -> str:
    """``"<error_type>: <message>"`` of a final SSE error event."""
    try:
        inner = unwrap(json.loads(event[len(b"data: ") :])["message"])  # the plugin's own error, if any
        return f"{inner['error_type']}: {inner['message']}"
    except (ValueError, KeyError, TypeError):
        return "the stream ended with an error event"


# A server span's attributes (LeanSpan.record): the request, how it was routed and how it ended.
SERVER_KEYS = key_set(
    (
        "http.request.method",
        "url.path",
        "http.response.status_code",
        "http.route",
        "tenant.id",
        "plugin.id",
        "error.type",
    )
)


def public_path(path: str) -> str:
    """``path`` as a span or a log line may show it: without an endpoint's hook id, which is
    the endpoint's credential (``/e/{hook_id}/...``)."""
    if not path.startswith("/e/"):
        return path
    _, slash, rest = path[3:].partition("/")
    return "/e/{hook_id}" + slash + rest


class RequestSpan:
    """One HTTP request's server span, made current in the request's task until :meth:`end`.

    The span stays open until the response is complete, so for an event stream it
    covers the whole relay and the ``plugin.session`` span nests inside it. Used by
    :class:`TracingMiddleware` and by the direct dispatch path (``daemon/direct.py``).
    """

    __slots__ = ("_token", "failure", "method", "path", "plugin_id", "span", "status")

    def __init__(self, span: Span, method: str, path: str, plugin_id: str | None) -> None:
        self.span = span
        self._token = attach(span)
        self.method = method
        self.path = path
        self.plugin_id = plugin_id
        self.status = 0
        self.failure: bytes | None = None  # the final SSE error event, if the stream ended in one

    def watch(self, body: bytes) -> None:
        """A chunk of the response body: a final error event marks the span failed."""
        if body.startswith(_SSE_ERROR):
            self.failure = body

    def end(self, route: str | None, tenant: str | None, exc: BaseException | None = None) -> None:
        """Name the span by its route, record how the request ended, and end it."""
        span = self.span
        lean = type(span) is LeanSpan
        if span.end_ns == 0 if lean else span.is_recording():  # type: ignore[attr-defined]
            method = self.method
            path = public_path(self.path)
            name = f"{method} {route or path}"
            if lean:
                span.name = name  # type: ignore[attr-defined]
            else:
                span.update_name(name)
            status = None
            error_type = None
            if self.failure is not None:  # a 200 whose stream ended in an error event
                error = _stream_error(self.failure)
                error_type = error.partition(":")[0]
                status = Status(StatusCode.ERROR, error)
            elif self.status >= 500:
                status = Status(StatusCode.ERROR, f"HTTP {self.status}")
            values = (method, path, self.status, route or None, tenant or None, self.plugin_id, error_type)
            record(span, SERVER_KEYS, values)
            if isinstance(exc, Exception):  # what the API's span context managers record
                span.record_exception(exc)
                if status is None:
                    status = Status(StatusCode.ERROR, f"{type(exc).__name__}: {exc}")
            if status is not None:
                span.set_status(status)
        detach(self._token)
        span.end()


class ServerSpans:
    """Starts the server span of each traced HTTP request, parented by ``traceparent``.

    Only the headers the configured propagators read are decoded, and only when present.
    """

    def __init__(self, untraced: Collection[str] = POLLING_PATHS) -> None:
        self.untraced = frozenset(untraced)
        self.tracer = Tracer(__name__)
        self.fields = {name.encode("latin-1") for name in propagate.get_global_textmap().fields}

    def traced(self, path: str) -> bool:
        return path not in self.untraced and not path.startswith("/debug/")

    def begin(self, method: str, path: str, headers: Iterable[tuple[bytes, bytes]]) -> RequestSpan:
        found = dict(headers)  # the last of a repeated header, as the propagators take it
        context = None
        if not self.fields.isdisjoint(found):
            present = self.fields & found.keys()
            carrier = {name.decode("latin-1"): found[name].decode("latin-1") for name in present}
            context = propagate.extract(carrier)
        span = self.tracer.start_span(f"{method} {path}", context, kind=SpanKind.SERVER)
        plugin_id = found.get(b"x-plugin-id")
        return RequestSpan(span, method, path, None if plugin_id is None else plugin_id.decode("latin-1"))


class TracingMiddleware:
    """A server span per HTTP request (:class:`RequestSpan`), named by route template."""

    def __init__(
        self,
        app: ASGIApp,
        routes: Mapping[Callable[..., Any], str],
        untraced: Collection[str] = POLLING_PATHS,
    ) -> None:
        self.app = app
        self.routes = routes
        self.spans = ServerSpans(untraced)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "")
        if scope["type"] != "http" or not self.spans.traced(path):
            await self.app(scope, receive, send)
            return
        request = self.spans.begin(scope["method"], path, scope["headers"])

        async def send_and_watch(message: Message) -> None:
            if message["type"] == "http.response.start":
                request.status = message["status"]
            elif message["type"] == "http.response.body":
                request.watch(message.get("body", b""))
            await send(message)

        failed: BaseException | None = None
        try:
            await self.app(scope, receive, send_and_watch)
        except BaseException as exc:
            failed = exc
            raise
        finally:
            route = self.routes.get(scope.get("endpoint"))  # type: ignore[arg-type]
            request.end(route, (scope.get("path_params") or {}).get("tenant_id"), failed)
