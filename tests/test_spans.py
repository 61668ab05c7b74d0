"""The lean tracer's own decisions: sampling without the sampler, the ring's batches, the context."""

from __future__ import annotations

import enum
import threading

import pytest
from opentelemetry import context as context_api
from opentelemetry import trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.sampling import (
    ALWAYS_OFF,
    ALWAYS_ON,
    DEFAULT_OFF,
    DEFAULT_ON,
    ParentBased,
    Sampler,
    TraceIdRatioBased,
)
from opentelemetry.trace import NonRecordingSpan, SpanContext, TraceFlags

from daemon import spans
from daemon.spans import LeanSpan, LeanTracerProvider, fixed_decision, key_set, record
from daemon.tracing import BATCH, ServerSpans, SpanRing

TRACE_ID = 0x0AF7651916CD43DD8448EB211C80319C
CALLER_SPAN = 0xB7AD6B7169203331


def _parent(*, sampled: bool, remote: bool) -> context_api.Context:
    flags = TraceFlags(TraceFlags.SAMPLED if sampled else TraceFlags.DEFAULT)
    span = NonRecordingSpan(SpanContext(TRACE_ID, CALLER_SPAN, is_remote=remote, trace_flags=flags))
    return trace.set_span_in_context(span)


class Asked(Sampler):
    """A sampler the tracer must ask: samples a root, never a child of a remote parent."""

    def __init__(self) -> None:
        self.calls = 0

    def should_sample(self, parent_context, trace_id, name, kind=None, attributes=None, links=None, trace_state=None):  # type: ignore[no-untyped-def] # noqa: E501
        self.calls += 1
        parent = trace.get_current_span(parent_context).get_span_context()
        return (ALWAYS_OFF if parent.is_valid else ALWAYS_ON).should_sample(
            parent_context, trace_id, name, kind, attributes, links
        )

    def get_description(self) -> str:
        return "asked"


# (sampler, root, remote sampled parent, remote unsampled parent, local unsampled parent)
DECISIONS = [
    (ALWAYS_ON, True, True, True, True),
    (ALWAYS_OFF, False, False, False, False),
    (DEFAULT_ON, True, True, False, False),  # parentbased_always_on, the SDK's default
    (DEFAULT_OFF, False, True, False, False),
    (ParentBased(ALWAYS_ON, remote_parent_not_sampled=ALWAYS_ON), True, True, True, False),
]


@pytest.mark.parametrize(("sampler", "root", "sampled", "unsampled", "local_unsampled"), DECISIONS)
def test_sampling_decided_without_the_sampler_as_the_sampler_decides(
    sampler: Sampler, root: bool, sampled: bool, unsampled: bool, local_unsampled: bool
) -> None:
    decide = fixed_decision(sampler)
    assert decide is not None
    tracer = LeanTracerProvider(Resource.create({}), sampler, None).get_tracer("test")
    cases = [
        (None, root),
        (_parent(sampled=True, remote=True), sampled),
        (_parent(sampled=False, remote=True), unsampled),
        (_parent(sampled=False, remote=False), local_unsampled),
    ]
    for context, expected in cases:
        # What the SDK's own sampler says for the same parent: the shortcut must agree with it.
        parent = trace.get_current_span(context).get_span_context()
        assert sampler.should_sample(context, TRACE_ID, "x").decision.is_sampled() is expected
        assert decide(parent) is expected
        span = tracer.start_span("span", context)
        assert span.is_recording() is expected
        assert span.get_span_context().trace_flags.sampled is expected
        if parent.is_valid:
            assert span.get_span_context().trace_id == TRACE_ID


def test_other_samplers_are_asked_for_each_local_root() -> None:
    assert fixed_decision(TraceIdRatioBased(0.5)) is None
    asked = Asked()
    assert fixed_decision(asked) is None
    assert fixed_decision(ParentBased(asked)) is None
    tracer = LeanTracerProvider(Resource.create({}), asked, None).get_tracer("test")
    root = tracer.start_span("root")
    assert root.is_recording() and asked.calls == 1
    child = tracer.start_span("child", trace.set_span_in_context(root))
    assert child.is_recording() and asked.calls == 1  # a child of a recorded span: not asked
    assert not tracer.start_span("remote child", _parent(sampled=True, remote=True)).is_recording()
    assert asked.calls == 2


def test_the_ring_shows_spans_before_a_batch_is_full_and_keeps_every_thread_s() -> None:
    ring = SpanRing(10_000)
    tracer = LeanTracerProvider(Resource.create({}), ALWAYS_ON, ring.keep).get_tracer("test")
    with tracer.start_span("alone", attributes={"n": 1}):
        pass
    (alone,) = ring.snapshot()  # one span, far from a batch: still on the page
    assert alone.name == "alone" and alone.attributes == (("n", 1),)

    per_thread = BATCH * 5 + 3

    def end_spans(index: int) -> None:
        for i in range(per_thread):
            tracer.start_span("threaded", attributes={"thread": index, "i": i}).end()

    threads = [threading.Thread(target=end_spans, args=(t,)) for t in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    kept = [s for s in ring.snapshot() if s.name == "threaded"]
    assert sorted(dict(s.attributes)["thread"] * per_thread + dict(s.attributes)["i"] for s in kept) == list(
        range(4 * per_thread)
    )


class Color(enum.IntEnum):
    RED = 1


def test_the_ring_keeps_sdk_spans_with_values_of_other_types() -> None:
    """An SDK span's attribute may be an int subclass or bytes; the ring keeps it as plain data."""
    ring = SpanRing(100)
    provider = TracerProvider(sampler=ALWAYS_ON)
    provider.add_span_processor(ring)
    attributes = {"color": Color.RED, "raw": b"ab"}
    with provider.get_tracer("test").start_as_current_span("sdk", attributes=attributes):
        pass
    (span,) = ring.snapshot()
    assert dict(span.attributes) == {"color": 1, "raw": "b'ab'"}


def test_lean_attributes_are_bounded_when_kept_not_as_set() -> None:
    ring = SpanRing(100)
    provider = LeanTracerProvider(Resource.create({}), ALWAYS_ON, ring.keep)
    limit = provider.limits.value_length
    span = provider.get_tracer("test").start_span("bounded", attributes={"long": "x" * (limit + 10)})
    assert isinstance(span, LeanSpan)
    span.set_attributes({"list": ["a", "b"], "bad": object(), "nested": [["no"]]})
    span.set_attribute("n", 3)
    span.end()
    (kept,) = ring.snapshot()
    assert dict(kept.attributes) == {"long": "x" * limit, "list": ("a", "b"), "n": 3}
    assert span.readable().attributes == {"long": "x" * limit, "list": ("a", "b"), "n": 3}


def test_a_server_span_is_current_until_it_ends_then_the_context_is_as_before() -> None:
    ring = SpanRing(100)
    provider = LeanTracerProvider(Resource.create({}), ALWAYS_ON, ring.keep)
    server_spans = ServerSpans()
    server_spans.tracer = provider.get_tracer("test")  # not the global provider: tests share it
    before = context_api.get_current()
    traceparent = f"00-{TRACE_ID:032x}-{CALLER_SPAN:016x}-01".encode()
    headers = [(b"traceparent", traceparent), (b"x-plugin-id", b"a/b")]
    request = server_spans.begin("POST", "/plugin/t1/dispatch/tool/invoke", headers)
    current = trace.get_current_span()
    assert current is request.span and current.get_span_context().trace_id == TRACE_ID
    request.status = 200
    request.end("/plugin/{tenant_id}/dispatch/tool/invoke", "t1")
    assert context_api.get_current() == before
    (server,) = ring.snapshot()
    assert server.name == "POST /plugin/{tenant_id}/dispatch/tool/invoke"
    assert server.parent_id == CALLER_SPAN and server.is_root
    assert dict(server.attributes)["plugin.id"] == "a/b"


def test_values_each_within_the_limit_are_kept_whole_however_long_together() -> None:
    """The ring skips bounding a span whose whole encoding is within the value limit; a span
    whose values are only long together is bounded value by value, and keeps every one."""
    ring = SpanRing(100)
    provider = LeanTracerProvider(Resource.create({}), ALWAYS_ON, ring.keep)
    limit = provider.limits.value_length
    values = {f"k{i}": str(i) * (limit // 2) for i in range(1, 5)}
    values |= {"at": "y" * limit, "over": "z" * (limit + 1)}
    provider.get_tracer("test").start_span("long together", attributes=values).end()
    (kept,) = ring.snapshot()
    assert dict(kept.attributes) == values | {"over": "z" * limit}


def test_recorded_attributes_are_shown_and_exported_without_the_ones_not_had() -> None:
    """``record``: a key set and a value per key, None for an attribute the span does not have;
    attributes set one by one win over recorded ones, and a second record keeps the first."""
    ring = SpanRing(100)
    provider = LeanTracerProvider(Resource.create({}), ALWAYS_ON, ring.keep)
    keys = key_set(("a", "b", "c"))
    span = provider.get_tracer("test").start_span("recorded")
    assert isinstance(span, LeanSpan)
    span.record(keys, ("x", None, 3))
    span.end()
    (kept,) = ring.snapshot()
    assert kept.attributes == (("a", "x"), ("c", 3))
    assert span.readable().attributes == {"a": "x", "c": 3}

    both = provider.get_tracer("test").start_span("both", attributes={"c": "set"})
    assert isinstance(both, LeanSpan)
    both.record(keys, ("x", 2, 3))
    both.record(key_set(("d",)), (4,))
    both.end()
    expected = {"a": "x", "b": 2, "c": "set", "d": 4}
    assert dict(ring.snapshot()[-1].attributes) == expected and both.readable().attributes == expected

    sdk = TracerProvider(sampler=ALWAYS_ON).get_tracer("test").start_span("sdk")
    record(sdk, keys, ("x", None, 3))  # on another span: set_attributes, without the Nones
    assert dict(sdk.attributes or {}) == {"a": "x", "c": 3}


def test_the_ring_shows_exactly_its_capacity_of_the_newest_spans() -> None:
    """Spans are kept a batch to an entry; the page still sees the newest ``capacity``, in order."""
    ring = SpanRing(100)
    tracer = LeanTracerProvider(Resource.create({}), ALWAYS_ON, ring.keep).get_tracer("test")
    ended = BATCH * 7 + 5
    for i in range(ended):
        tracer.start_span("n", attributes={"i": i}).end()
        if i in (10, BATCH * 3):  # a snapshot drains a partial batch into an entry of its own
            assert [dict(s.attributes)["i"] for s in ring.snapshot()][-1] == i
    assert [dict(s.attributes)["i"] for s in ring.snapshot()] == list(range(ended - 100, ended))


def test_the_ring_keeps_values_json_cannot_carry_as_they_are_and_whole_trace_ids() -> None:
    """A span is kept as a JSON array: an integer past 64 bits or a string with a lone surrogate
    is kept as text instead of failing the batch, and a 128-bit trace id comes back whole."""
    ring = SpanRing(100)
    provider = LeanTracerProvider(Resource.create({}), ALWAYS_ON, ring.keep)
    tracer = provider.get_tracer("test")
    recorded = tracer.start_span("recorded")
    assert isinstance(recorded, LeanSpan)
    recorded.trace_id = (1 << 127) | 5  # the high bit set: past what one JSON number holds
    recorded.record(key_set(("big", "text", "n")), (1 << 70, "a\ud800b", 7))
    recorded.end()
    tracer.start_span("set", attributes={"big": -(1 << 65), "ok": "plain"}).end()
    first, second = ring.snapshot()
    assert first.trace_id == format((1 << 127) | 5, "032x")
    assert dict(first.attributes) == {"big": str(1 << 70), "text": "a?b", "n": 7}
    assert dict(second.attributes) == {"big": str(-(1 << 65)), "ok": "plain"}


def test_key_sets_registered_by_two_threads_at_once_each_keep_their_own_index(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A span ending on another thread registers its key set while this one is registering."""
    first, second = ("concurrent.first",), ("concurrent.second",)
    other_registered = threading.Event()
    indexes: dict[tuple[str, ...], int | tuple[str, ...]] = {}
    others: list[threading.Thread] = []

    def register(keys: tuple[str, ...]) -> None:
        indexes[keys] = key_set(keys)
        other_registered.set()

    class Interleaving(list):  # the shared list of sets, letting another thread in mid-append
        def append(self, keys: tuple[str, ...]) -> None:
            super().append(keys)
            if keys == first:
                others.append(threading.Thread(target=register, args=(second,)))
                others[0].start()
                other_registered.wait(timeout=1.0)  # a lock keeps it out: then it runs after

    monkeypatch.setattr(spans, "_KEY_SETS", Interleaving(spans._KEY_SETS))
    monkeypatch.setattr(spans, "_KEY_INDEX", dict(spans._KEY_INDEX))
    indexes[first] = key_set(first)
    others[0].join(timeout=10)
    assert not others[0].is_alive()
    assert spans.key_names(indexes[first]) == first
    assert spans.key_names(indexes[second]) == second
