"""Flame graphs of a server under load (py-spy), and where its samples go, by category.

py-spy runs with ``--nonblocking``: the default mode stops the process for every
sample, which was measured to inflate the write path to ~60% of samples. Idle
threads (blocked in epoll or ``read``) are not sampled, so the samples are the
process's busy time. Each sample is attributed to one category by walking its
stack from the innermost frame outwards; the first frame a rule recognises
decides. Frames of the daemon and the relay are recognised by module and
function and, for the hot lines, by the source text of the sampled line (so a
sample on ``obj = loads(line)`` counts as JSON decode even though orjson itself
is C code with no Python frame).

    python -m bench.profile bench/results/<run>/profiles/*.speedscope.json
"""

from __future__ import annotations

import argparse
import json
import linecache
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


def record(pid: int, out_base: Path, seconds: float, rate: int = 250) -> dict[str, Path]:
    """Two back-to-back recordings of ``pid``: speedscope JSON (for attribution) and an SVG."""
    outputs = {
        "speedscope": out_base.with_suffix(".speedscope.json"),
        "flamegraph": out_base.with_suffix(".svg"),
    }
    for fmt, path in outputs.items():
        command = [str(PY_SPY), "record", "--nonblocking", "-p", str(pid), "-r", str(rate)]
        command += ["-d", str(max(1, round(seconds))), "-f", fmt, "-o", str(path)]
        done = subprocess.run(command, capture_output=True, text=True, timeout=seconds + 60)
        if done.returncode != 0 or not path.exists():
            raise RuntimeError(f"py-spy failed ({done.returncode}): {done.stderr[-2000:]}")
    return outputs


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


_DAEMON_FUNCTIONS = {
    ("runtime.py", "_read_stdout"): "pipe reads",
    ("runtime.py", "_handle_lines"): "other",
    ("relay.py", "pipe_data_received"): "pipe reads",
    ("relay.py", "handle_lines"): "other",
    ("relay.py", "write_event"): "send path",
    ("relay.py", "finish"): "send path",
    ("relay.py", "data_received"): "request handling",
    ("relay.py", "invoke"): "request handling",
    ("codec.py", "sse_success"): "JSON encode",
    ("codec.py", "sse_error"): "JSON encode",
    ("codec.py", "_stdlib_dumps"): "JSON encode",
}
_DAEMON_MODULES = {
    "stream.py": "stream hand-off",
    "session.py": "stream hand-off",
    "validation.py": "validation",
    "sse.py": "send path",
    "app.py": "request handling",
    "dispatch.py": "request handling",
    "codec.py": "request handling",
    "invocation.py": "other",
    "runtime.py": "other",
    "telemetry.py": "telemetry",
}
_LIBRARIES = (
    ("opentelemetry", "telemetry"),
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
        by_source = _by_source(_line(frame))
        if by_source is not None:
            return by_source
        function = name.rsplit(".", 1)[-1]
        return _DAEMON_FUNCTIONS.get((base, function)) or _DAEMON_MODULES.get(base, "other")
    if path.endswith("/json/__init__.py"):
        return "JSON decode" if "loads" in name else "JSON encode" if "dumps" in name else None
    for needle, category in _LIBRARIES:
        if needle in path:
            if category is None:  # uvicorn's HTTP protocol: sending vs parsing requests
                return "send path" if name.endswith(("send", "write", "flush")) else "request handling"
            return category
    return None


def attribute(speedscope: Path) -> Counter[str]:
    """Samples per category, over every thread of the recording."""
    data = json.loads(speedscope.read_text())
    frames = data["shared"]["frames"]
    decided = [categorize(f) for f in frames]
    counts: Counter[str] = Counter()
    for profile in data["profiles"]:
        for stack in profile["samples"]:
            category = next((decided[i] for i in reversed(stack) if decided[i] is not None), "other")
            counts[category] += 1
    return counts


def shares(counts: Counter[str]) -> dict[str, float]:
    total = sum(counts.values()) or 1
    return {c: counts.get(c, 0) / total for c in CATEGORIES}


def table(rows: dict[str, Counter[str]]) -> str:
    """A markdown table: one row per recording, percent of samples per category."""
    head = "| recording | samples | " + " | ".join(CATEGORIES) + " | serialization |"
    lines = [head, "|" + " --- |" * (len(CATEGORIES) + 3)]
    for label, counts in rows.items():
        share = shares(counts)
        cells = " | ".join(f"{share[c] * 100:.1f}" for c in CATEGORIES)
        serialization = sum(share[c] for c in SERIALIZATION) * 100
        lines.append(f"| {label} | {sum(counts.values())} | {cells} | **{serialization:.1f}** |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("files", nargs="+", type=Path, help="speedscope JSON files from py-spy")
    args = parser.parse_args()
    print(table({f.name.removesuffix(".speedscope.json"): attribute(f) for f in args.files}))


if __name__ == "__main__":
    main()
