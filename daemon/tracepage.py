"""``/debug/traces``: recent and slowest traces from the in-memory span ring, as HTML.

In the spirit of OpenCensus zPages and Go's ``/debug/requests``: a table per span
name (count, errors, latency percentiles and histogram), lists of recent, slowest
and failed spans of one name, and the waterfall of one trace. Rendered on the
server from the ring's snapshot; no script, no external assets.
"""

from __future__ import annotations

import html
import time
from collections import defaultdict
from collections.abc import Iterable, Sequence
from urllib.parse import urlencode

from daemon.tracing import KeptSpan

BUCKETS = [
    (0.001, "<1ms"),
    (0.01, "<10ms"),
    (0.1, "<100ms"),
    (1.0, "<1s"),
    (10.0, "<10s"),
    (float("inf"), "≥10s"),
]
LIST_LIMIT = 50

STYLE = """
body{font:14px/1.4 system-ui,sans-serif;margin:24px;color:#1d2330}
h1{font-size:20px;margin:0 0 4px} h2{font-size:16px;margin:24px 0 8px}
.sub{color:#667} a{color:#1f5fbf;text-decoration:none} a:hover{text-decoration:underline}
table{border-collapse:collapse} th,td{padding:4px 10px;text-align:left;border-bottom:1px solid #e3e6ec}
th{background:#f4f6f9;font-weight:600} td.num{text-align:right;font-variant-numeric:tabular-nums}
.err{color:#b3261e;font-weight:600} .hist{display:flex;gap:2px;align-items:flex-end;height:28px}
.hist span{display:inline-block;width:14px;background:#7aa7e6}
.wf{position:relative;height:18px;background:#f4f6f9;min-width:480px}
.bar{position:absolute;top:2px;height:14px;background:#4a86d8;border-radius:2px}
.bar.error{background:#d9534f} .attrs{color:#556;font-size:12px;font-family:ui-monospace,monospace}
"""


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:.2f} ms" if seconds < 10 else f"{seconds:.1f} s"


def _percentile(sorted_values: Sequence[float], q: float) -> float:
    if not sorted_values:
        return 0.0
    index = min(len(sorted_values) - 1, max(0, round(q * (len(sorted_values) - 1))))
    return sorted_values[index]


def _page(title: str, body: str) -> str:
    return (
        f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
        f"<style>{STYLE}</style></head><body>{body}</body></html>"
    )


def _link(text: str, **query: str) -> str:
    return f"<a href='?{html.escape(urlencode(query))}'>{html.escape(text)}</a>"


def _span_rows(spans: Iterable[KeptSpan]) -> str:
    rows = []
    for span in spans:
        started = time.strftime("%H:%M:%S", time.localtime(span.start_ns / 1e9))
        status = "<span class='err'>error</span>" if span.failed else "ok"
        rows.append(
            f"<tr><td>{started}</td><td class='num'>{_ms(span.duration)}</td><td>{status}</td>"
            f"<td>{html.escape(span.name)}</td>"
            f"<td>{_link(span.trace_id[:16], trace=span.trace_id)}</td></tr>"
        )
    header = "<tr><th>started</th><th>duration</th><th>status</th><th>span</th><th>trace</th></tr>"
    return f"<table>{header}{''.join(rows)}</table>" if rows else "<p class='sub'>none</p>"


PROFILE_LINK = (
    "On-CPU flame graph of the daemon: <a href='/debug/profile?seconds=10'>record 10 s</a>"
    " (<a href='/debug/profile?seconds=10&amp;format=speedscope'>speedscope JSON</a>)"
)


def render_index(spans: Sequence[KeptSpan], capacity: int) -> str:
    by_name: dict[str, list[KeptSpan]] = defaultdict(list)
    for span in spans:
        by_name[span.name].append(span)
    rows = []
    for name in sorted(by_name):
        group = by_name[name]
        durations = sorted(s.duration for s in group)
        errors = sum(s.failed for s in group)
        counts = [0] * len(BUCKETS)
        for d in durations:
            counts[next(i for i, (limit, _) in enumerate(BUCKETS) if d < limit)] += 1
        peak = max(counts) or 1
        bars = "".join(
            f"<span title='{label}: {n}' style='height:{max(1, round(26 * n / peak)) if n else 0}px'></span>"
            for (_, label), n in zip(BUCKETS, counts, strict=True)
        )
        error_cell = f"<span class='err'>{errors}</span>" if errors else "0"
        rows.append(
            f"<tr><td>{html.escape(name)}</td><td class='num'>{len(group)}</td>"
            f"<td class='num'>{error_cell}</td>"
            f"<td class='num'>{_ms(_percentile(durations, 0.5))}</td>"
            f"<td class='num'>{_ms(_percentile(durations, 0.99))}</td>"
            f"<td class='num'>{_ms(durations[-1])}</td><td><div class='hist'>{bars}</div></td>"
            f"<td>{_link('recent', name=name, view='recent')} · {_link('slowest', name=name, view='slowest')}"
            f" · {_link('errors', name=name, view='errors')}</td></tr>"
        )
    header = (
        "<tr><th>span name</th><th>count</th><th>errors</th><th>p50</th><th>p99</th><th>max</th>"
        "<th>latency (&lt;1ms … ≥10s)</th><th></th></tr>"
    )
    table = f"<table>{header}{''.join(rows)}</table>" if rows else "<p class='sub'>no spans yet</p>"
    roots = [s for s in spans if s.is_root]
    recent = sorted(roots, key=lambda s: s.start_ns, reverse=True)[:20]
    body = (
        "<h1>Traces</h1>"
        f"<p class='sub'>{len(spans)} most recent spans kept in memory (ring of {capacity}).</p>"
        f"<p class='sub'>{PROFILE_LINK}</p>"
        f"{table}<h2>Recent traces</h2>{_span_rows(recent)}"
    )
    return _page("Traces", body)


def render_list(spans: Sequence[KeptSpan], name: str, view: str) -> str:
    chosen = [s for s in spans if s.name == name]
    if view == "slowest":
        chosen.sort(key=lambda s: s.duration, reverse=True)
    else:
        if view == "errors":
            chosen = [s for s in chosen if s.failed]
        chosen.sort(key=lambda s: s.start_ns, reverse=True)
    body = (
        f"<p>{_link('← all spans')}</p><h1>{html.escape(name)}</h1>"
        f"<p class='sub'>{html.escape(view)}</p>{_span_rows(chosen[:LIST_LIMIT])}"
    )
    return _page(f"{name} ({view})", body)


def render_trace(spans: Sequence[KeptSpan], trace_id: str) -> str:
    members = [s for s in spans if s.trace_id == trace_id]
    if not members:
        body = f"<p>{_link('← all spans')}</p><h1>Trace {html.escape(trace_id)}</h1><p>not in the ring</p>"
        return _page("Trace not found", body)
    by_id = {s.span_id: s for s in members}
    children: dict[int | None, list[KeptSpan]] = defaultdict(list)
    for span in members:
        children[span.parent_id if span.parent_id in by_id else None].append(span)
    start = min(s.start_ns for s in members)
    end = max(s.end_ns for s in members)
    total = max(end - start, 1)
    rows: list[str] = []

    def walk(parent: int | None, depth: int) -> None:
        for span in sorted(children.get(parent, []), key=lambda s: s.start_ns):
            left = 100 * (span.start_ns - start) / total
            width = max(0.3, 100 * (span.end_ns - span.start_ns) / total)
            css = "bar error" if span.failed else "bar"
            attrs = ", ".join(f"{k}={v}" for k, v in span.attributes)
            if span.status:
                attrs = f"status: {span.status}; " + attrs
            rows.append(
                f"<tr><td style='padding-left:{10 + 18 * depth}px'>{html.escape(span.name)}</td>"
                f"<td class='num'>{_ms(span.duration)}</td>"
                f"<td><div class='wf'><div class='{css}' style='left:{left:.2f}%;width:{width:.2f}%'></div>"
                f"</div><div class='attrs'>{html.escape(attrs)}</div></td></tr>"
            )
            walk(span.span_id, depth + 1)

    walk(None, 0)
    header = "<tr><th>span</th><th>duration</th><th>timeline</th></tr>"
    body = (
        f"<p>{_link('← all spans')}</p><h1>Trace {html.escape(trace_id)}</h1>"
        f"<p class='sub'>{len(members)} spans, {_ms(total / 1e9)}</p><table>{header}{''.join(rows)}</table>"
    )
    return _page(f"Trace {trace_id}", body)
