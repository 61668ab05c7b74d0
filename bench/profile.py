"""Flame graphs of a server under load (py-spy), and where its CPU goes, by category.

py-spy runs with ``--nonblocking``: the default mode stops the process for every
sample, which was measured to inflate the write path to ~60% of samples. Each
sample is attributed to one category by walking its stack from the innermost
frame outwards; the first frame a rule recognises decides. Frames of the daemon
and the relay are recognised by module and function and, for the hot lines, by
the source text of the sampled line (so a sample on ``obj = loads(line)`` counts
as JSON decode even though orjson itself is C code with no Python frame).

Samples are not CPU time. py-spy's idle detection lets through many samples of a
thread that is blocked (measured here: the reader thread sampled busy 62% of the
time while the kernel charged it 31% of a core). So while py-spy records, the
kernel's per-thread CPU accounting (``/proc/<pid>/task/<tid>/stat``) is read too,
and each thread's CPU is shared out over categories: every sample outside a
blocking call counts one sampling interval, and the thread's remaining CPU goes to
the category of its blocking call (the reader's ``os.read``: pipe reads; the event
loop's ``run``: event loop). The tables report shares of the server's CPU.

    python -m bench.profile bench/results/<run>/profiles/*.speedscope.json
"""

from __future__ import annotations

import argparse
import json
import linecache
import os
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

CATEGORIES = (
    "JSON decode",
    "JSON encode",
    "validation",
    "locking",
    "send path",
    "pipe reads",
    "stream hand-off",
    "request handling",
    "event loop",
    "telemetry",
    "other",
)
SERIALIZATION = ("JSON decode", "JSON encode")
PY_SPY = Path(sys.executable).parent / "py-spy"
RATE = 250  # samples per second and thread


def thread_cpu(pid: int) -> dict[int, float]:
    """CPU seconds (user + system) of every thread of ``pid``, from the kernel's accounting."""
    ticks = os.sysconf("SC_CLK_TCK")
    out = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/stat") as stat:
                fields = stat.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        out[int(tid)] = (int(fields[11]) + int(fields[12])) / ticks  # utime, stime
    return out


def record(pid: int, out_base: Path, seconds: float, rate: int = RATE) -> dict[str, Any]:
    """Two back-to-back recordings of ``pid``: speedscope JSON (attribution) and an SVG.

    Returns the files and each thread's CPU seconds during the speedscope recording.
    """
    outputs = {
        "speedscope": out_base.with_suffix(".speedscope.json"),
        "flamegraph": out_base.with_suffix(".svg"),
    }
    cpu: dict[int, float] = {}
    for fmt, path in outputs.items():
        command = [str(PY_SPY), "record", "--nonblocking", "-p", str(pid), "-r", str(rate)]
        command += ["-d", str(max(1, round(seconds))), "-f", fmt, "-o", str(path)]
        before = thread_cpu(pid)
        done = subprocess.run(command, capture_output=True, text=True, timeout=seconds + 60)
        if done.returncode != 0 or not path.exists():
            raise RuntimeError(f"py-spy failed ({done.returncode}): {done.stderr[-2000:]}")
        if fmt == "speedscope":
            after = thread_cpu(pid)
            cpu = {tid: after[tid] - before.get(tid, 0.0) for tid in after}
    return {"files": outputs, "thread_cpu": cpu, "rate": rate}


def _line(frame: dict[str, Any]) -> str:
    return linecache.getline(frame.get("file") or "", frame.get("line") or 0).strip()


def _by_source(text: str) -> str | None:
    if "loads(" in text:
        return "JSON decode"
    if "dumps(" in text or "sse_success(" in text or "sse_error(" in text:
        return "JSON encode"
    if "_lock" in text or "_guard" in text or ".acquire(" in text:
        return "locking"
    if "send_body(" in text:
        return "send path"
    return None


# Decided by function before the source text: the request written to the plugin's stdin
# (one small dumps, then the pipe write that costs the time) is per-invocation work.
_FUNCTIONS_FIRST = {
    ("runtime.py", "send"): "request handling",
    ("connection.py", "send"): "request handling",
    ("process.py", "send"): "request handling",
}
_DAEMON_FUNCTIONS = {
    ("runtime.py", "_read_stdout"): "pipe reads",
    ("runtime.py", "_handle_lines"): "other",
    ("process.py", "_read_stdout"): "pipe reads",
    ("connection.py", "_handle_lines"): "other",
    ("process.py", "data_received"): "pipe reads",  # the asyncio reader of the plugin's stdout
    ("direct.py", "_flush"): "send path",
    ("direct.py", "send_body"): "send path",
    ("direct.py", "_writable"): "send path",
    ("direct.py", "complete"): "send path",
    ("relay.py", "pipe_data_received"): "pipe reads",
    ("relay.py", "handle_lines"): "other",
    ("relay.py", "write_event"): "send path",
    ("relay.py", "finish"): "send path",
    ("relay.py", "data_received"): "request handling",
    ("relay.py", "invoke"): "request handling",
    ("codec.py", "sse_success"): "JSON encode",
    ("codec.py", "sse_error"): "JSON encode",
    ("codec.py", "_stdlib_dumps"): "JSON encode",
    ("wire.py", "sse_success"): "JSON encode",
    ("wire.py", "sse_error"): "JSON encode",
    ("wire.py", "_stdlib_dumps"): "JSON encode",
}
_DAEMON_MODULES = {
    "stream.py": "stream hand-off",
    "session.py": "stream hand-off",
    "validation.py": "validation",
    "sse.py": "send path",
    "app.py": "request handling",
    "direct.py": "request handling",  # the HTTP side of direct dispatch; its writes: send path
    "entry.py": "request handling",
    "limits.py": "request handling",
    "dispatch.py": "request handling",
    "codec.py": "request handling",  # wire.py before its rename
    "wire.py": "request handling",
    "invocation.py": "other",
    "runtime.py": "other",  # before the runtime became a package
    "process.py": "other",
    "connection.py": "other",
    "backwards.py": "other",
    "pool.py": "other",
    "telemetry.py": "telemetry",
    "tracing.py": "telemetry",
    "metrics.py": "telemetry",
}
_LIBRARIES = (
    ("opentelemetry", "telemetry"),
    ("prometheus_client", "telemetry"),
    ("/json/decoder.py", "JSON decode"),
    ("/json/encoder.py", "JSON encode"),
    ("jsonschema", "validation"),
    ("referencing", "validation"),
    ("rpds", "validation"),
    ("/threading.py", "locking"),
    ("uvicorn/protocols/http", None),  # by function below
    ("starlette", "request handling"),
    ("pydantic", "request handling"),
    ("httptools", "request handling"),
    ("/uuid.py", "request handling"),
    ("/asyncio/", "event loop"),
    ("uvloop", "event loop"),
    ("anyio", "event loop"),
    ("/selectors.py", "event loop"),
    ("/logging/", "other"),
)


def categorize(frame: dict[str, Any]) -> str | None:
    """The category one frame decides, or None to look at its caller."""
    path = frame.get("file") or ""
    name = frame.get("name") or ""
    base = path.rsplit("/", 1)[-1]
    if "/daemon/" in path or path.endswith("bench/relay.py"):
        function = name.rsplit(".", 1)[-1]
        first = _FUNCTIONS_FIRST.get((base, function))
        if first is not None:
            return first
        by_source = _by_source(_line(frame))
        if by_source is not None:
            return by_source
        return _DAEMON_FUNCTIONS.get((base, function)) or _DAEMON_MODULES.get(base, "other")
    if path.endswith("/json/__init__.py"):
        return "JSON decode" if "loads" in name else "JSON encode" if "dumps" in name else None
    for needle, category in _LIBRARIES:
        if needle in path:
            if category is None:  # uvicorn's HTTP protocol: sending vs parsing requests
                return "send path" if name.endswith(("send", "write", "flush")) else "request handling"
            return category
    return None


def _is_blocking(frame: dict[str, Any]) -> bool:
    """A frame where a thread waits: samples there may be idle time, not CPU."""
    name = frame.get("name") or ""
    if name.endswith("_read_stdout") and "os.read(" in _line(frame):
        return True
    return name in ("Runner.run", "run", "run_until_complete", "BaseEventLoop.run_forever", "_read_stderr")


def _thread_id(profile_name: str) -> int | None:
    match = re.match(r"Thread (\d+)", profile_name)
    return int(match.group(1)) if match else None


def attribute(speedscope: Path, thread_cpu: dict[int, float] | None = None, rate: int = RATE) -> Counter[str]:
    """CPU seconds per category (sample counts when no thread CPU was recorded)."""
    data = json.loads(speedscope.read_text())
    frames = data["shared"]["frames"]
    decided = [categorize(f) for f in frames]
    blocking = [_is_blocking(f) for f in frames]
    total: Counter[str] = Counter()
    for profile in data["profiles"]:
        busy: Counter[str] = Counter()  # samples outside blocking calls
        waiting: Counter[str] = Counter()  # samples in a blocking call
        for stack in profile["samples"]:
            index = next((i for i in reversed(stack) if decided[i] is not None), None)
            category = decided[index] if index is not None else "other"
            (waiting if index is not None and blocking[index] else busy)[category or "other"] += 1
        tid = _thread_id(profile["name"])
        if thread_cpu is None or tid not in thread_cpu:
            total.update(busy)
            total.update(waiting)
            continue
        cpu = thread_cpu[tid]
        busy_cpu = sum(busy.values()) / rate
        scale = min(1.0, cpu / busy_cpu) if busy_cpu else 0.0
        for category, n in busy.items():
            total[category] += n / rate * scale  # type: ignore[assignment]
        residual = cpu - busy_cpu * scale
        waited = sum(waiting.values())
        for category, n in waiting.items():
            total[category] += residual * n / waited  # type: ignore[assignment]
    return total


def deciding_frames(speedscope: Path) -> Counter[tuple[str, str]]:
    """Samples per (category, deciding frame as ``function file:line``), to audit the rules."""
    data = json.loads(speedscope.read_text())
    frames = data["shared"]["frames"]
    decided = [categorize(f) for f in frames]
    counts: Counter[tuple[str, str]] = Counter()
    for profile in data["profiles"]:
        for stack in profile["samples"]:
            index = next((i for i in reversed(stack) if decided[i] is not None), None)
            if index is None:
                counts[("other", "(no frame recognised)")] += 1
                continue
            frame = frames[index]
            where = f"{frame['name']} {frame.get('file', '').rsplit('/', 1)[-1]}:{frame.get('line')}"
            counts[(decided[index] or "other", where)] += 1
    return counts


def shares(counts: Counter[str]) -> dict[str, float]:
    """Each category's fraction of the total (CPU seconds or samples)."""
    total = sum(counts.values()) or 1
    return {c: counts.get(c, 0) / total for c in CATEGORIES}


def table(rows: dict[str, Counter[str]]) -> str:
    """A markdown table: one row per recording, percent of samples per category."""
    head = "| recording | total | " + " | ".join(CATEGORIES) + " | serialization |"
    lines = [head, "|" + " --- |" * (len(CATEGORIES) + 3)]
    for label, counts in rows.items():
        share = shares(counts)
        cells = " | ".join(f"{share[c] * 100:.1f}" for c in CATEGORIES)
        serialization = sum(share[c] for c in SERIALIZATION) * 100
        lines.append(f"| {label} | {sum(counts.values()):.4g} | {cells} | **{serialization:.1f}** |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("files", nargs="+", type=Path, help="speedscope JSON files from py-spy")
    parser.add_argument("--top", type=int, default=0, help="also list the N frames deciding most samples")
    args = parser.parse_args()
    print(table({f.name.removesuffix(".speedscope.json"): attribute(f) for f in args.files}))
    for f in args.files if args.top else []:
        print(f"\n{f.name}:")
        for (category, where), n in deciding_frames(f).most_common(args.top):
            print(f"  {n:>5}  {category:<17} {where}")


if __name__ == "__main__":
    main()
