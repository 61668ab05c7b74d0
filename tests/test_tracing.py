"""Traces over the wire: spans exported with OTLP (HTTP and gRPC) to receivers that decode the protobuf."""

from __future__ import annotations

import gc
import gzip
import threading
from collections.abc import Callable, Iterator
from concurrent import futures
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest
from opentelemetry import trace
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2_grpc
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.sampling import ALWAYS_ON
from opentelemetry.trace import Status, StatusCode

from daemon.spans import DEFAULT_VALUE_LENGTH, LeanTracerProvider
from daemon.testing import Daemon, copy_plugin
from daemon.tracing import SpanRing
from tests.test_endpoints import PLUGIN as ENDPOINTS
from tests.test_endpoints import hook, setup
from tests.test_runtime import FP, wait_for

TRACE_ID = "0af7651916cd43dd8448eb211c80319c"
CALLER_SPAN = "b7ad6b7169203331"
TRACEPARENT = f"00-{TRACE_ID}-{CALLER_SPAN}-01"
INVOKE_ROUTE = "POST /plugin/{tenant_id}/dispatch/tool/invoke"


class Receiver:
    """An OTLP/HTTP traces endpoint on loopback that keeps every span it is sent."""

    def __init__(self) -> None:
        self.spans: list[dict[str, Any]] = []
        self.requests = 0
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                if self.headers.get("Content-Encoding") == "gzip":
                    body = gzip.decompress(body)
                request = ExportTraceServiceRequest()
                request.ParseFromString(body)
                receiver.add(request, self.path, self.headers.get("Content-Type", ""))
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def add(self, request: ExportTraceServiceRequest, path: str, content_type: str) -> None:
        assert path == "/v1/traces" and content_type == "application/x-protobuf"
        self.keep(request)

    def keep(self, request: ExportTraceServiceRequest) -> None:
        self.requests += 1
        for resource_spans in request.resource_spans:
            resource = {a.key: a.value.string_value for a in resource_spans.resource.attributes}
            for scope_spans in resource_spans.scope_spans:
                for span in scope_spans.spans:
                    self.spans.append(
                        {
                            "name": span.name,
                            "trace_id": span.trace_id.hex(),
                            "span_id": span.span_id.hex(),
                            "parent": span.parent_span_id.hex(),
                            "attributes": {a.key: _value(a.value) for a in span.attributes},
                            "status": span.status.code,
                            "status_message": span.status.message,
                            "resource": resource,
                        }
                    )

    def named(self, name: str) -> list[dict[str, Any]]:
        return [s for s in self.spans if s["name"] == name]


def _value(value: Any) -> Any:
    kind = value.WhichOneof("value")
    return getattr(value, kind) if kind else None


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver()
    yield r
    r.server.shutdown()


def traced_daemon(start: Callable[..., Daemon], plugins: Path, receiver: Receiver, **env: Any) -> Daemon:
    daemon = start(
        plugins,
        otel_exporter_otlp_endpoint=receiver.url,
        otel_bsp_schedule_delay=50,
        otel_service_name="daemon-under-test",
        **env,
    )
    daemon.wait_ready(FP)
    return daemon


@pytest.mark.parametrize("validator", ["owner", "lock"])
def test_spans_reach_a_collector_with_names_parentage_and_attributes(
    receiver: Receiver, start: Callable[..., Daemon], fastproto: Callable[..., Path], validator: str
) -> None:
    daemon = traced_daemon(start, fastproto(), receiver, validator=validator)
    params = {"count": 3, "variables": 4, "storage_key": "k", "echo_context": True}
    request = daemon.invocation(FP, "emit", params)
    request["headers"]["traceparent"] = TRACEPARENT
    r = httpx.post(daemon.invoke_url(), **request, timeout=60)
    assert r.status_code == 200
    wait_for(lambda: receiver.named("plugin.session") and receiver.named(INVOKE_ROUTE))

    (http,) = receiver.named(INVOKE_ROUTE)
    assert http["trace_id"] == TRACE_ID and http["parent"] == CALLER_SPAN
    assert http["attributes"]["http.route"] == "/plugin/{tenant_id}/dispatch/tool/invoke"
    assert http["attributes"]["tenant.id"] == "t1"
    assert http["attributes"]["plugin.id"] == FP
    assert http["attributes"]["http.response.status_code"] == 200
    assert http["resource"]["service.name"] == "daemon-under-test"

    (session,) = receiver.named("plugin.session")
    assert session["parent"] == http["span_id"] and session["trace_id"] == TRACE_ID
    attrs = session["attributes"]
    assert attrs["plugin.tool"] == "emit" and attrs["validation.design"] == validator
    assert attrs["plugin.messages_in"] == attrs["plugin.messages_out"] == 2 + 3 + 4 + 1
    assert attrs["plugin.bytes_in"] > 0 and attrs["plugin.bytes_out"] > 0
    assert attrs["plugin.decode_seconds"] > 0 and attrs["plugin.encode_seconds"] > 0
    assert attrs["plugin.outcome"] == "success" or validator == "lock"
    assert "plugin.time_to_first_event_seconds" in attrs
    assert attrs["plugin.provider"] == "fastproto" and attrs["tenant.id"] == "t1"
    assert attrs["plugin.instance"] == 0 and len(attrs["plugin.session_id"]) == 32

    (validate,) = receiver.named("output.validate")  # exactly once, under the session span
    assert validate["parent"] == session["span_id"]
    assert validate["attributes"]["validation.design"] == validator
    if validator == "owner":
        assert validate["attributes"]["validation.verdict"] == "pass"
        assert validate["attributes"]["validation.variables"] == 5
        assert "validation.error" not in validate["attributes"]  # recorded as None: not exported

    backwards = receiver.named("plugin.backwards")
    assert [b["attributes"]["backwards.operation"] for b in backwards] == ["set", "get"]
    assert all(b["parent"] == session["span_id"] for b in backwards)

    spawn = receiver.named("plugin.spawn")
    assert spawn and spawn[0]["attributes"]["plugin.outcome"] == "ready"

    # The plugin received the session span as its parent, in the envelope's context.
    echoed = next(e for e in r.text.split("\n\n") if '"json_object":{"traceparent"' in e)
    assert f"00-{TRACE_ID}-{session['span_id']}-01" in echoed


def test_spans_reach_a_grpc_collector_when_the_protocol_says_grpc(
    receiver: Receiver, start: Callable[..., Daemon], fastproto: Callable[..., Path]
) -> None:
    class TraceService(trace_service_pb2_grpc.TraceServiceServicer):
        def Export(self, request: ExportTraceServiceRequest, context: Any) -> Any:
            receiver.keep(request)
            return ExportTraceServiceResponse()

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(TraceService(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        daemon = start(
            fastproto(),
            otel_exporter_otlp_endpoint=f"http://127.0.0.1:{port}",
            otel_exporter_otlp_protocol="grpc",
            otel_exporter_otlp_insecure="true",
            otel_bsp_schedule_delay=50,
        )
        daemon.wait_ready(FP)
        events = daemon.invoke(FP, "emit", {"echo_context": True})
        assert events[-1].ok
        wait_for(lambda: receiver.named("plugin.session"))
        (session,) = receiver.named("plugin.session")
        (http,) = receiver.named(INVOKE_ROUTE)
        assert session["parent"] == http["span_id"]
        # No caller trace: the plugin gets the session span as parent of a new, sampled trace.
        sent = events[0].message["message"]["json_object"]
        assert sent == {"traceparent": f"00-{session['trace_id']}-{session['span_id']}-01"}
        daemon.stop()
    finally:
        server.stop(grace=None)


def test_a_failed_session_is_an_error_span(
    receiver: Receiver, start: Callable[..., Daemon], fastproto: Callable[..., Path]
) -> None:
    daemon = traced_daemon(start, fastproto(), receiver)
    daemon.invoke(FP, "emit", {"count": 1, "violate": True})
    wait_for(lambda: receiver.named("output.validate") and receiver.named("plugin.session"))
    (session,) = receiver.named("plugin.session")
    assert session["attributes"]["plugin.outcome"] == "validation_failed"
    assert session["status"] == 2  # STATUS_CODE_ERROR
    (validate,) = receiver.named("output.validate")
    assert validate["attributes"]["validation.verdict"] == "fail"
    assert '"not-a-bool" is not of type "boolean"' in validate["attributes"]["validation.error"]


def test_sampling_follows_otel_traces_sampler(
    receiver: Receiver, start: Callable[..., Daemon], fastproto: Callable[..., Path]
) -> None:
    daemon = traced_daemon(start, fastproto(), receiver, otel_traces_sampler="always_off")
    for _ in range(3):
        assert daemon.invoke(FP, "emit")[-1].ok
    daemon.stop()  # flushes the exporter
    assert receiver.named("plugin.session") == []


def test_tracing_off_removes_spans_and_the_trace_page(
    receiver: Receiver, start: Callable[..., Daemon], fastproto: Callable[..., Path]
) -> None:
    daemon = traced_daemon(start, fastproto(), receiver, otel_sdk_disabled="true")
    events = daemon.invoke(FP, "emit", {"echo_context": True})
    assert events[0].message["message"]["json_object"] == {}  # no trace context sent to the plugin
    r = httpx.get(f"{daemon.url}/debug/traces")
    assert r.status_code == 404 and "tracing is disabled" in r.json()["message"]
    daemon.stop()
    assert receiver.spans == []


def test_the_ring_keeps_what_the_trace_page_shows_in_few_collected_objects() -> None:
    """A kept span leaves the garbage collector nothing to walk, whatever its attributes
    (it is one ``bytes``); a ring of ``ReadableSpan`` left it 11 a span, of tuples 1-2."""
    ring = SpanRing(1000)
    provider = TracerProvider(sampler=ALWAYS_ON)
    provider.add_span_processor(ring)
    tracer = provider.get_tracer("test")
    remote = trace.set_span_in_context(
        trace.NonRecordingSpan(trace.SpanContext(int(TRACE_ID, 16), int(CALLER_SPAN, 16), is_remote=True))
    )

    def one_trace(i: int) -> None:
        attributes = {"n": i, "tag": ("a", "b")}
        with (
            tracer.start_as_current_span("outer", context=remote, attributes=attributes),
            tracer.start_as_current_span("inner") as inner,
        ):
            inner.set_status(Status(StatusCode.ERROR, "bad"))

    one_trace(0)
    outer, inner = sorted(ring.snapshot(), key=lambda s: s.name, reverse=True)
    assert (outer.name, outer.trace_id, outer.parent_id, outer.is_root) == (
        "outer",
        TRACE_ID,
        int(CALLER_SPAN, 16),
        True,
    )
    assert outer.attributes == (("n", 0), ("tag", ("a", "b")))
    assert not outer.failed and outer.status == ""
    assert (inner.parent_id, inner.is_root, inner.failed, inner.status) == (outer.span_id, False, True, "bad")
    assert 0 < inner.duration <= outer.duration

    def collected_objects() -> int:
        gc.collect()
        gc.collect()  # a tuple is untracked once what it holds is
        return len(gc.get_objects())

    empty = collected_objects()
    for i in range(1, 2000):  # fills the ring, then replaces every kept span three times
        one_trace(i)
    assert len(ring.snapshot()) == 1000
    per_span = (collected_objects() - empty) / 1000
    print(f"objects the collector walks per kept span: {per_span:.2f}")
    assert per_span < 0.1  # ReadableSpan: 11 a span


def test_a_plugin_error_type_of_a_megabyte_is_not_kept_per_span(
    receiver: Receiver, start: Callable[..., Daemon], fastproto: Callable[..., Path]
) -> None:
    daemon = traced_daemon(start, fastproto(), receiver)
    events = daemon.invoke(FP, "emit", {"count": 1, "error_at": 1, "error_type_size": 1_000_000})
    assert len(events[-1].error["error_type"]) == 1_000_000  # the caller still gets the plugin's error
    wait_for(lambda: receiver.named("plugin.session"))
    (session,) = receiver.named("plugin.session")
    assert session["status"] == 2  # STATUS_CODE_ERROR
    assert 0 < len(session["status_message"]) <= DEFAULT_VALUE_LENGTH
    assert all(len(str(v)) <= DEFAULT_VALUE_LENGTH for v in session["attributes"].values())

    page = httpx.get(f"{daemon.url}/debug/traces?trace={session['trace_id']}", timeout=30)
    assert page.status_code == 200 and "plugin.session" in page.text
    assert len(page.text) < 200_000  # the page shows the truncated text, not a megabyte


def test_the_ring_is_bounded_in_bytes_and_long_values_are_truncated() -> None:
    """Spans with long attribute values: each value is cut to the limit, and the ring keeps
    the newest spans that fit its byte budget, however many its span count allows."""
    ring = SpanRing(10_000, max_bytes=1_000_000)
    provider = LeanTracerProvider(Resource.create({}), ALWAYS_ON, ring.keep)
    tracer = provider.get_tracer("test")
    for i in range(2000):
        with tracer.start_as_current_span("big", attributes={"n": i, "text": "x" * 100_000}) as span:
            span.set_status(Status(StatusCode.ERROR, "e" * 100_000))
    kept = ring.snapshot()
    assert 100 <= len(kept) < 2000  # bounded by bytes, not by the count of 10,000
    assert ring.bytes <= 1_000_000
    assert kept[-1].attributes == (("n", 1999), ("text", "x" * DEFAULT_VALUE_LENGTH))
    assert kept[-1].status == "e" * DEFAULT_VALUE_LENGTH

    # Spans the SDK made (no truncation by default) are bounded by the ring's budget too.
    sdk_ring = SpanRing(10_000, max_bytes=1_000_000)
    sdk = TracerProvider(sampler=ALWAYS_ON)
    sdk.add_span_processor(sdk_ring)
    for _ in range(100):
        with sdk.get_tracer("test").start_as_current_span("big", attributes={"text": "x" * 100_000}):
            pass
    assert 1 <= len(sdk_ring.snapshot()) <= 10 and sdk_ring.bytes <= 1_000_000


def test_an_endpoint_session_span_names_its_endpoint_not_a_provider(
    receiver: Receiver, start: Callable[..., Daemon], sdk_plugins_installed: Path, tmp_path: Path
) -> None:
    plugins = tmp_path / "endpoint-plugins"
    plugins.mkdir()
    copy_plugin("echo_endpoints", plugins)
    daemon = start(plugins, otel_exporter_otlp_endpoint=receiver.url, otel_bsp_schedule_delay=50)
    daemon.wait_ready(ENDPOINTS)
    with httpx.Client(timeout=60) as client:
        endpoint = setup(daemon, client, "t1", "traced", {"greeting": "hi", "api_key": "sk-0123456789"})
        assert client.get(hook(daemon, endpoint, "/echo")).status_code == 200
    wait_for(lambda: receiver.named("plugin.session"))
    (session,) = receiver.named("plugin.session")
    attrs = session["attributes"]
    assert attrs["endpoint.id"] == endpoint.id and "plugin.provider" not in attrs
    assert attrs["plugin.id"] == ENDPOINTS and attrs["plugin.outcome"] == "success"
    # The hook id is the endpoint's credential: no span exported or shown carries it.
    (server,) = [s for s in receiver.spans if s["name"].startswith("GET /e/")]
    assert server["name"] == "GET /e/{hook_id}/{path:path}"
    assert server["attributes"]["url.path"] == "/e/{hook_id}/echo"
    assert not [s for s in receiver.spans if endpoint.hook_id in repr(s)]
    page = httpx.get(f"{daemon.url}/debug/traces?trace={server['trace_id']}", timeout=30)
    assert page.status_code == 200 and "/e/{hook_id}/echo" in page.text
    assert (
        endpoint.hook_id not in page.text
        and endpoint.hook_id not in httpx.get(f"{daemon.url}/debug/traces").text
    )
