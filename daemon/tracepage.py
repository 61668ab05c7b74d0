"""``/debug/traces``: recent and slowest traces from the in-memory span ring, as HTML.

In the spirit of OpenCensus zPages and Go's ``/debug/requests``: a table per span
name (count, errors, latency percentiles and histogram), lists of recent, slowest
and failed spans, and the waterfall of one trace. Every view can be narrowed to the
traces of one tenant, plugin, tool or outcome, and a trace found by its id (or the
start of it). Rendered on the server from the ring's snapshot; no script, no
external assets.
"""

from __future__ import annotations

import html
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any
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
RECENT_LIMIT = 20
# query parameter -> the span attribute a trace is matched on
ATTRIBUTE_FILTERS = {"tenant": "tenant.id", "plugin": "plugin.id", "tool": "plugin.tool"}
VIEWS = ("recent", "slowest", "errors")

STYLE = """
body{font:14px/1.4 system-ui,sans-serif;margin:24px;color:#1d2330}
h1{font-size:20px;margin:0 0 4px} h2{font-size:16px;margin:24px 0 8px}
.sub{color:#667} a{color:#1f5fbf;text-decoration:none} a:hover{text-decoration:underline}
table{border-collapse:collapse} th,td{padding:4px 10px;text-align:left;border-bottom:1px solid #e3e6ec;
vertical-align:top} th{background:#f4f6f9;font-weight:600}
td.num{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}
td.when,td.nw{white-space:nowrap}
.err{color:#b3261e;font-weight:600} .errmsg{color:#b3261e}
.hist{display:flex;gap:2px;align-items:flex-end;height:28px}
.hist span{display:inline-block;width:14px;background:#7aa7e6}
.wf{position:relative;height:18px;background:#f4f6f9;min-width:480px}
.bar{position:absolute;top:2px;height:14px;background:#4a86d8;border-radius:2px}
.bar.error{background:#d9534f}
.attrs{color:#556;font-size:12px;font-family:ui-monospace,monospace;margin-top:4px}
.attrs div{white-space:pre-wrap;word-break:break-all} .attrs .k{color:#8a93a3}
form{display:flex;gap:10px;align-items:end;flex-wrap:wrap;margin:12px 0;padding:10px;background:#f4f6f9}
form label{display:flex;flex-direction:column;font-size:12px;color:#556}
form input,form select{font:13px system-ui}
.filters{color:#1d2330;background:#fff7e0;padding:4px 8px;display:inline-block}
"""


@dataclass
class TraceSummary:
    """What one trace was about, gathered from all of its spans."""

    tenant: str = ""
    plugin: str = ""
    tool: str = ""
    error: str = ""  # "<type>: <message>" of the most telling failed span
    failed: bool = False


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:.2f} ms" if seconds < 10 else f"{seconds:.1f} s"


def _when(ns: int) -> str:
    """Local date and time with its zone, to the millisecond."""
    moment = datetime.fromtimestamp(ns / 1e9).astimezone()
    milliseconds = f"{moment.microsecond // 1000:03d}"
    return moment.strftime(f"%Y-%m-%d %H:%M:%S.{milliseconds} %Z")


def _duration(seconds: float) -> str:
    if seconds >= 1:
        return f"{seconds:.3f} s"
    if seconds >= 0.001:
        return f"{seconds * 1e3:.3f} ms"
    return f"{seconds * 1e6:.1f} µs"


def _size(count: int) -> str:
    if count < 1024:
        return f"{count} bytes"
    if count < 1024 * 1024:
        return f"{count / 1024:.1f} KiB"
    return f"{count / (1024 * 1024):.1f} MiB"


def human_value(key: str, value: Any) -> str:
    """An attribute's value with its unit: durations in s/ms/µs, sizes in bytes/KiB/MiB."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return str(value)
    if key.endswith("_seconds"):
        return _duration(float(value))
    if key.endswith("bytes") or key.split(".")[-1].startswith("bytes_"):
        return _size(int(value))
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value)


def _percentile(sorted_values: Sequence[float], q: float) -> float:
    if not sorted_values:
        return 0.0
    index = min(len(sorted_values) - 1, max(0, round(q * (len(sorted_values) - 1))))
    return sorted_values[index]


def _page(title: str, body: str) -> str:
    return (
        f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
        "<link rel='icon' href='data:,'>"  # no /favicon.ico request to land in the ring
        f"<style>{STYLE}</style></head><body>{body}</body></html>"
    )


def _link(text: str, **query: str) -> str:
    target = urlencode({k: v for k, v in query.items() if v})
    return f"<a href='?{html.escape(target)}'>{html.escape(text)}</a>"


def summarize(spans: Iterable[KeptSpan]) -> dict[str, TraceSummary]:
    """A summary per trace id: its tenant, plugin and tool, and its error if one failed."""
    summaries: dict[str, TraceSummary] = defaultdict(TraceSummary)
    for span in spans:
        summary = summaries[span.trace_id]
        attributes = dict(span.attributes)
        summary.tenant = summary.tenant or str(attributes.get("tenant.id", ""))
        if "plugin.tool" in attributes or not summary.plugin:  # the session's exact id beats a header
            summary.plugin = str(attributes.get("plugin.id", summary.plugin))
        summary.tool = summary.tool or str(attributes.get("plugin.tool", ""))
        if span.failed:
            summary.failed = True
            # A described status ("Type: message") says more than "HTTP 500".
            if span.status and (not summary.error or summary.error.startswith("HTTP ")):
                summary.error = span.status
    return dict(summaries)


class Filters:
    """The narrowing asked for in the query string; traces are kept or dropped whole."""

    def __init__(self, query: Mapping[str, str]) -> None:
        self.name = query.get("name", "").strip()
        self.attributes = {key: query.get(key, "").strip() for key in ATTRIBUTE_FILTERS}
        outcome = query.get("outcome", "").strip()
        self.outcome = outcome if outcome in ("ok", "error") else ""

    def query(self, **changes: str) -> dict[str, str]:
        current = {"name": self.name, **self.attributes, "outcome": self.outcome, **changes}
        return {k: v for k, v in current.items() if v}

    @property
    def active(self) -> bool:
        return bool(self.name or self.outcome or any(self.attributes.values()))

    def keeps_trace(self, summary: TraceSummary) -> bool:
        found = {"tenant": summary.tenant, "plugin": summary.plugin, "tool": summary.tool}
        if any(wanted and found[key] != wanted for key, wanted in self.attributes.items()):
            return False
        return not self.outcome or summary.failed == (self.outcome == "error")

    def apply(self, spans: Sequence[KeptSpan], summaries: Mapping[str, TraceSummary]) -> list[KeptSpan]:
        return [
            s
            for s in spans
            if self.keeps_trace(summaries[s.trace_id]) and (not self.name or s.name == self.name)
        ]

    def describe(self) -> str:
        parts = [f"span {self.name}"] if self.name else []
        parts += [f"{key} {value}" for key, value in self.attributes.items() if value]
        if self.outcome:
            parts.append(f"outcome {self.outcome}")
        return ", ".join(parts)


def _options(values: Iterable[str], chosen: str, blank: str) -> str:
    items = [f"<option value=''>{html.escape(blank)}</option>"]
    for value in values:
        selected = " selected" if value == chosen else ""
        items.append(f"<option value='{html.escape(value)}'{selected}>{html.escape(value)}</option>")
    return "".join(items)


def _filter_form(spans: Sequence[KeptSpan], summaries: Mapping[str, TraceSummary], filters: Filters) -> str:
    names = sorted({s.name for s in spans})
    seen = {
        "tenant": sorted({t.tenant for t in summaries.values() if t.tenant}),
        "plugin": sorted({t.plugin for t in summaries.values() if t.plugin}),
        "tool": sorted({t.tool for t in summaries.values() if t.tool}),
    }
    fields = [f"<label>span name<select name='name'>{_options(names, filters.name, 'any')}</select></label>"]
    for key in ATTRIBUTE_FILTERS:
        choices = _options(seen[key], filters.attributes[key], "any")
        fields.append(f"<label>{key}<select name='{key}'>{choices}</select></label>")
    choices = _options(("ok", "error"), filters.outcome, "any")
    fields.append(f"<label>outcome<select name='outcome'>{choices}</select></label>")
    fields.append("<button>Filter</button>")
    if filters.active:
        fields.append(_link("clear"))
    find = (
        "<form method='get'><label>trace id (or its start)"
        "<input name='trace' size='34' placeholder='4bf92f3577b34da6…'></label><button>Find</button></form>"
    )
    return f"<form method='get'>{''.join(fields)}</form>{find}"


def _status_cell(span: KeptSpan) -> str:
    if not span.failed:
        return "ok"
    return f"<span class='err'>error</span> <span class='errmsg'>{html.escape(span.status)}</span>"


def _trace_rows(spans: Iterable[KeptSpan], summaries: Mapping[str, TraceSummary]) -> str:
    """One row per span, with what its trace was about and, if the trace failed, why."""
    rows = []
    for span in spans:
        summary = summaries.get(span.trace_id, TraceSummary())
        if span.failed:
            status = _status_cell(span)
        elif summary.failed:
            status = f"ok <span class='errmsg'>(trace failed: {html.escape(summary.error)})</span>"
        else:
            status = "ok"
        target = " · ".join(html.escape(x) for x in (summary.plugin, summary.tool) if x)
        rows.append(
            f"<tr><td class='when'>{_when(span.start_ns)}</td><td class='num'>{_ms(span.duration)}</td>"
            f"<td>{html.escape(span.name)}</td><td class='nw'>{html.escape(summary.tenant)}</td>"
            f"<td>{target}</td>"
            f"<td>{status}</td><td>{_link(span.trace_id[:16], trace=span.trace_id)}</td></tr>"
        )
    header = (
        "<tr><th>started</th><th>duration</th><th>span</th><th>tenant</th><th>plugin · tool</th>"
        "<th>status</th><th>trace</th></tr>"
    )
    return f"<table>{header}{''.join(rows)}</table>" if rows else "<p class='sub'>none</p>"


PROFILE_LINK = (
    "On-CPU flame graph of the daemon: <a href='/debug/profile?seconds=10'>record 10 s</a>"
    " (<a href='/debug/profile?seconds=10&amp;format=speedscope'>speedscope JSON</a>)"
)


def _name_table(spans: Sequence[KeptSpan], filters: Filters) -> str:
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
        views = " · ".join(_link(view, **filters.query(name=name, view=view)) for view in VIEWS)
        rows.append(
            f"<tr><td>{html.escape(name)}</td><td class='num'>{len(group)}</td>"
            f"<td class='num'>{error_cell}</td>"
            f"<td class='num'>{_ms(_percentile(durations, 0.5))}</td>"
            f"<td class='num'>{_ms(_percentile(durations, 0.99))}</td>"
            f"<td class='num'>{_ms(durations[-1])}</td><td><div class='hist'>{bars}</div></td>"
            f"<td>{views}</td></tr>"
        )
    header = (
        "<tr><th>span name</th><th>count</th><th>errors</th><th>p50</th><th>p99</th><th>max</th>"
        "<th>latency (&lt;1ms … ≥10s)</th><th></th></tr>"
    )
    return f"<table>{header}{''.join(rows)}</table>" if rows else "<p class='sub'>no spans</p>"


def render(spans: Sequence[KeptSpan], query: Mapping[str, str], capacity: int) -> str:
    """The page the query string asks for: one trace, one list, or the index."""
    if query.get("trace", "").strip():
        return render_trace(spans, query["trace"].strip())
    view = query.get("view", "")
    if view in VIEWS and query.get("name"):
        return render_list(spans, query, view)
    return render_index(spans, query, capacity)


def _heading(filters: Filters, title: str) -> str:
    note = ""
    if filters.active:
        note = f" <span class='filters'>filtered: {html.escape(filters.describe())}</span>"
    return f"<h1>{html.escape(title)}{note}</h1>"


def render_index(spans: Sequence[KeptSpan], query: Mapping[str, str], capacity: int) -> str:
    summaries = summarize(spans)
    filters = Filters(query)
    chosen = filters.apply(spans, summaries)
    # Without a span name, a trace is listed once, by its root; with one, each span of that name.
    listed = chosen if filters.name else [s for s in chosen if s.is_root]
    recent = sorted(listed, key=lambda s: s.start_ns, reverse=True)[:RECENT_LIMIT]
    failed_traces = {s.trace_id for s in chosen if summaries[s.trace_id].failed}
    errors = sorted(
        (s for s in listed if s.trace_id in failed_traces), key=lambda s: s.start_ns, reverse=True
    )[:RECENT_LIMIT]
    body = (
        f"{_heading(filters, 'Traces')}"
        f"<p class='sub'>{len(spans)} most recent spans kept in memory (ring of {capacity}); polling routes"
        " are not traced unless TRACE_UNTRACED_PATHS says otherwise.</p>"
        f"<p class='sub'>{PROFILE_LINK}</p>"
        f"{_filter_form(spans, summaries, filters)}{_name_table(chosen, filters)}"
        f"<h2>Recent errors</h2>{_trace_rows(errors, summaries)}"
        f"<h2>Recent traces</h2>{_trace_rows(recent, summaries)}"
    )
    return _page("Traces", body)


def render_list(spans: Sequence[KeptSpan], query: Mapping[str, str], view: str) -> str:
    summaries = summarize(spans)
    filters = Filters(query)
    chosen = filters.apply(spans, summaries)
    if view == "slowest":
        chosen.sort(key=lambda s: s.duration, reverse=True)
    else:
        if view == "errors":
            chosen = [s for s in chosen if s.failed]
        chosen.sort(key=lambda s: s.start_ns, reverse=True)
    others = " · ".join(_link(v, **filters.query(view=v)) for v in VIEWS if v != view)
    body = (
        f"<p>{_link('← all spans')}</p>{_heading(filters, f'{filters.name}: {view}')}"
        f"<p class='sub'>also: {others}</p>{_trace_rows(chosen[:LIST_LIMIT], summaries)}"
    )
    return _page(f"{filters.name} ({view})", body)


def _attribute_lines(span: KeptSpan) -> str:
    lines = []
    if span.failed:
        lines.append(f"<div class='errmsg'>error: {html.escape(span.status or 'unknown')}</div>")
    elif span.status:
        lines.append(f"<div>status: {html.escape(span.status)}</div>")
    for key, value in span.attributes:
        shown = human_value(key, value)
        lines.append(f"<div><span class='k'>{html.escape(key)}</span> {html.escape(shown)}</div>")
    return f"<div class='attrs'>{''.join(lines)}</div>"


def render_trace(spans: Sequence[KeptSpan], wanted: str) -> str:
    wanted = wanted.lower()
    ids = {s.trace_id for s in spans if s.trace_id.startswith(wanted)} if len(wanted) >= 4 else set()
    if len(ids) > 1:
        links = "".join(f"<li>{_link(t, trace=t)}</li>" for t in sorted(ids))
        body = f"<p>{_link('← all spans')}</p><h1>Traces starting {html.escape(wanted)}</h1><ul>{links}</ul>"
        return _page("Several traces", body)
    if not ids:
        body = f"<p>{_link('← all spans')}</p><h1>Trace {html.escape(wanted)}</h1><p>not in the ring</p>"
        return _page("Trace not found", body)
    trace_id = ids.pop()
    members = [s for s in spans if s.trace_id == trace_id]
    summary = summarize(members)[trace_id]
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
            rows.append(
                f"<tr><td style='padding-left:{10 + 18 * depth}px'>{html.escape(span.name)}</td>"
                f"<td class='num'>{_ms(span.duration)}</td>"
                f"<td><div class='wf'><div class='{css}' style='left:{left:.2f}%;width:{width:.2f}%'></div>"
                f"</div>{_attribute_lines(span)}</td></tr>"
            )
            walk(span.span_id, depth + 1)

    walk(None, 0)
    about = ", ".join(
        f"{label} {html.escape(value)}"
        for label, value in (("tenant", summary.tenant), ("plugin", summary.plugin), ("tool", summary.tool))
        if value
    )
    outcome = "<p>ok</p>"
    if summary.failed:
        outcome = f"<p class='errmsg'><b>failed:</b> {html.escape(summary.error)}</p>"
    header = "<tr><th>span</th><th>duration</th><th>timeline</th></tr>"
    body = (
        f"<p>{_link('← all spans')}</p><h1>Trace {html.escape(trace_id)}</h1>"
        f"<p class='sub'>started {_when(start)}; {len(members)} spans, {_ms(total / 1e9)}"
        f"{'; ' + about if about else ''}</p>{outcome}<table>{header}{''.join(rows)}</table>"
    )
    return _page(f"Trace {trace_id}", body)
