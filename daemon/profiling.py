"""``GET /debug/profile?seconds=N``: an on-CPU flame graph of the running daemon, on demand.

What Go operators get from ``/debug/pprof/profile``: the daemon samples itself for N
seconds and answers with an SVG flame graph (``format=svg``, for a browser) or
speedscope JSON (``format=speedscope``, open it at https://www.speedscope.app).

On-CPU only. The kernel sends the process ``SIGPROF`` for every ``1/RATE`` s of CPU
it uses (``setitimer(ITIMER_PROF)``); the handler runs on the event loop's thread at
the bytecode it is executing and charges that thread's CPU since the last signal
(its own CPU clock) to that stack, and each other Python thread's CPU since then
(``pthread_getcpuclockid``: the kernel's per-thread accounting) to the stack
``sys._current_frames`` shows for it. A thread that waited (blocked in a read, on a
lock, or runnable but not given a core) used no CPU and adds nothing, however often
it is seen. That is why this is not py-spy: on a busy shared machine py-spy counted
runnable-but-waiting threads as busy (its top frame, a pipe write, was 11.5% of its
samples and ~1% of the CPU that ``perf`` measured), and it needs ptrace rights a
daemon often lacks. A sampler thread without the signal would be worse still: it
only gets the GIL when the loop lets go of it, mostly in ``epoll``, so it would see
the loop waiting, never working.

Caveats: a profile is statistical (sound over many samples, like any sampler's);
threads other than the event loop's are seen where they last released the GIL, so
their CPU is charged to the right function only roughly (the blocking read that
follows the work, for a reader thread); threads Python did not start (native
library threads) are not sampled, and the profile says how much of the process's
CPU (``/proc/self/stat``) it accounts for. Durations are bounded (``MAX_SECONDS``)
and one profile runs at a time.
"""

from __future__ import annotations

import html
import json
import os
import signal
import sys
import threading
import time
import zlib
from collections import Counter
from typing import Any

import anyio
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

RATE = 100  # samples per second of the process's CPU; ``hz`` sets it per request
MIN_RATE, MAX_RATE = 10, 1000
MAX_SECONDS = 60.0
DEFAULT_SECONDS = 10.0
Stack = tuple[tuple[str, str, int], ...]  # (function, file, first line), outermost first


class ProfileBusy(Exception):
    """Another profile is being recorded."""


class Profile:
    """CPU seconds charged to stacks: ``samples[(thread name, stack)] = seconds``."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.samples: Counter[tuple[str, Stack]] = Counter()
        self.process_cpu = 0.0  # CPU the whole process used meanwhile, every thread

    @property
    def sampled_cpu(self) -> float:
        return sum(self.samples.values())

    def collapsed(self) -> dict[tuple[str, ...], float]:
        """Stacks as frame names, the thread first, for the flame graph."""
        out: Counter[tuple[str, ...]] = Counter()
        for (thread, stack), cpu in self.samples.items():
            out[(f"thread {thread}", *(f"{fn} ({_short(file)})" for fn, file, _ in stack))] += cpu
        return out


def _short(path: str) -> str:
    """A path relative to the import root it was loaded from, for readable frame names."""
    for root in sorted((p for p in sys.path if p), key=len, reverse=True):
        if path.startswith(root + os.sep):
            return path[len(root) + 1 :]
    return path


def _process_cpu() -> float:
    with open("/proc/self/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _stack(frame: Any) -> Stack:
    frames = []
    while frame is not None:
        code = frame.f_code
        frames.append((code.co_qualname, code.co_filename, code.co_firstlineno))
        frame = frame.f_back
    frames.reverse()
    return tuple(frames)


def _discard(signum: int, frame: Any) -> None:
    """SIGPROF after a profile: nothing to do."""


class _Sampler:
    """Samples on ``SIGPROF``, which the kernel sends per ``1/rate`` s of the process's CPU.

    The handler runs on the main thread (the event loop's) between two bytecodes, with
    the frame that thread is executing: its samples are where it spends CPU, weighted by
    its own CPU clock. Other threads are charged from their CPU clocks at the stack
    ``sys._current_frames`` shows, which is where they last let go of the GIL.
    """

    def __init__(self, profile: Profile, rate: int) -> None:
        self.profile = profile
        self.rate = rate
        self.threads: dict[int, tuple[str, int]] = {}  # ident: (name, CPU clock id)
        self.last: dict[int, float] = {}
        self.main = threading.main_thread().ident or 0
        self.main_cpu = 0.0
        self.started_cpu = 0.0
        self.previous: Any = None

    def refresh_threads(self) -> None:
        """Called on the event loop, never in the handler (``threading.enumerate`` takes a lock)."""
        threads = {}
        for thread in threading.enumerate():
            if thread.ident is not None and thread.ident != self.main:
                try:
                    threads[thread.ident] = (thread.name, time.pthread_getcpuclockid(thread.ident))
                except OSError:
                    continue
        self.threads = threads  # replaced whole: the handler never sees it half-built

    def start(self) -> None:
        self.refresh_threads()
        self.started_cpu = _process_cpu()
        self.main_cpu = time.thread_time()
        for ident, (_, clock) in self.threads.items():
            self.last[ident] = time.clock_gettime(clock)
        self.previous = signal.signal(signal.SIGPROF, self._on_signal)
        signal.siginterrupt(signal.SIGPROF, False)  # interrupted system calls restart
        signal.setitimer(signal.ITIMER_PROF, 1 / self.rate, 1 / self.rate)

    def stop(self) -> None:
        signal.setitimer(signal.ITIMER_PROF, 0)
        # A signal still in flight must not meet SIGPROF's default action, which ends the process;
        # a handler that does nothing (not SIG_IGN, which plugins started later would inherit).
        keep = self.previous if callable(self.previous) else _discard
        signal.signal(signal.SIGPROF, keep)
        self.profile.process_cpu = _process_cpu() - self.started_cpu

    def _on_signal(self, signum: int, frame: Any) -> None:
        samples = self.profile.samples
        now = time.thread_time()
        used, self.main_cpu = now - self.main_cpu, now
        if used > 0 and frame is not None:
            samples[("MainThread", _stack(frame))] += used
        frames = sys._current_frames()
        for ident, (name, clock) in self.threads.items():
            try:
                cpu = time.clock_gettime(clock)
            except OSError:  # the thread has ended
                continue
            used = cpu - self.last.get(ident, cpu)
            self.last[ident] = cpu
            other = frames.get(ident)
            if used > 0 and other is not None:
                samples[(name, _stack(other))] += used


def speedscope(profile: Profile) -> dict[str, Any]:
    """The speedscope file format: one sampled profile per thread, weights in microseconds."""
    frames: list[dict[str, Any]] = []
    index: dict[tuple[str, str, int], int] = {}
    by_thread: dict[str, tuple[list[list[int]], list[int]]] = {}
    for (thread, stack), cpu in sorted(profile.samples.items(), key=lambda item: item[0][0]):
        ids = []
        for frame in stack:
            if frame not in index:
                index[frame] = len(frames)
                frames.append({"name": frame[0], "file": _short(frame[1]), "line": frame[2]})
            ids.append(index[frame])
        samples, weights = by_thread.setdefault(thread, ([], []))
        samples.append(ids)
        weights.append(round(cpu * 1e6))
    profiles = [
        {
            "type": "sampled",
            "name": f"thread {thread} (on-CPU)",
            "unit": "microseconds",
            "startValue": 0,
            "endValue": sum(weights),
            "samples": samples,
            "weights": weights,
        }
        for thread, (samples, weights) in by_thread.items()
    ]
    return {
        "$schema": "https://www.speedscope.app/file-format-schema.json",
        "name": _title(profile),
        "exporter": "plugin-daemon /debug/profile",
        "activeProfileIndex": 0,
        "shared": {"frames": frames},
        "profiles": profiles,
    }


def _title(profile: Profile) -> str:
    return (
        f"plugin-daemon pid {os.getpid()}: on-CPU {profile.sampled_cpu:.2f} s sampled of the process's "
        f"{profile.process_cpu:.2f} s over {profile.seconds:g} s"
    )


WIDTH = 1200
ROW = 17
MIN_WIDTH = 0.3  # px; narrower frames are left out


def _colour(name: str) -> str:
    h = zlib.crc32(name.encode())
    return f"rgb({205 + h % 50},{90 + (h >> 8) % 130},{40 + (h >> 16) % 50})"


def flamegraph_svg(profile: Profile) -> str:
    """A flame graph (callers below, callees above), widths proportional to CPU time."""
    tree: dict[str, Any] = {"value": 0.0, "children": {}}
    for stack, cpu in profile.collapsed().items():
        node = tree
        node["value"] += cpu
        for name in stack:
            node = node["children"].setdefault(name, {"value": 0.0, "children": {}})
            node["value"] += cpu
    total = tree["value"] or 1.0
    boxes: list[tuple[str, float, float, int, float]] = []  # name, CPU s, x, depth, width

    def layout(node: dict[str, Any], x: float, depth: int) -> None:
        for name, child in sorted(node["children"].items()):
            width = child["value"] / total * WIDTH
            if width >= MIN_WIDTH:
                boxes.append((name, child["value"], x, depth, width))
                layout(child, x, depth + 1)
            x += width

    layout(tree, 0.0, 0)
    height = (max((b[3] for b in boxes), default=0) + 1) * ROW + 50
    frames = "".join(_box(*box, total=total, bottom=height - 4) for box in boxes)
    return (
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{height}" '
        f'viewBox="0 0 {WIDTH} {height}" font-family="monospace" font-size="11">'
        '<rect width="100%" height="100%" fill="#fdfdf8"/>'
        f'<text x="6" y="18" font-size="13">{html.escape(_title(profile))}</text>'
        '<text x="6" y="34" fill="#555">widths are CPU time of every Python thread; '
        f"hover a frame for its share; waiting threads add nothing</text>{frames}</svg>"
    )


def _box(name: str, cpu: float, x: float, depth: int, width: float, *, total: float, bottom: int) -> str:
    y = bottom - (depth + 1) * ROW
    label = html.escape(name)
    text = ""
    chars = int((width - 6) / 6.6)  # monospace 11 px
    if chars >= 3:
        shown = name if len(name) <= chars else name[: chars - 2] + ".."
        text = f'<text x="{x + 3:.1f}" y="{y + ROW - 5}">{html.escape(shown)}</text>'
    return (
        f'<g class="frame"><title>{label}: {cpu * 1e3:.1f} ms on CPU, {cpu / total * 100:.2f}%</title>'
        f'<rect x="{x:.1f}" y="{y}" width="{width:.1f}" height="{ROW - 1}" fill="{_colour(name)}" rx="2"/>'
        f"{text}</g>"
    )


class Profiler:
    """One recording at a time. The sampler's handler needs the main thread: the event loop's."""

    def __init__(self) -> None:
        self._busy = False

    async def run(self, seconds: float, rate: int = RATE) -> Profile:
        if self._busy:
            raise ProfileBusy
        if threading.current_thread() is not threading.main_thread():
            raise RuntimeError("the profiler samples on signals, which only the main thread receives")
        self._busy = True
        sampler = _Sampler(Profile(seconds), rate)
        try:
            sampler.start()
            deadline = time.monotonic() + seconds
            while (left := deadline - time.monotonic()) > 0:
                await anyio.sleep(min(left, 0.25))
                sampler.refresh_threads()
        finally:
            sampler.stop()
            self._busy = False
        return sampler.profile


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"code": -status, "message": message, "data": None}, status_code=status)


async def respond(request: Request, profiler: Profiler) -> Response:
    """The route's work once access is granted: parse, record, render."""
    params = request.query_params
    try:
        seconds = float(params.get("seconds", DEFAULT_SECONDS))
    except ValueError:
        return _error(400, f"seconds must be a number of seconds up to {MAX_SECONDS:g}")
    if not 0 < seconds <= MAX_SECONDS:
        return _error(400, f"seconds must be more than 0 and at most {MAX_SECONDS:g}")
    try:
        rate = int(params.get("hz", RATE))
    except ValueError:
        rate = 0
    if not MIN_RATE <= rate <= MAX_RATE:
        message = f"hz must be a whole number from {MIN_RATE} to {MAX_RATE} (samples per CPU second)"
        return _error(400, message)
    fmt = params.get("format", "svg")
    if fmt not in ("svg", "speedscope"):
        return _error(400, "format must be svg or speedscope")
    try:
        profile = await profiler.run(seconds, rate)
    except ProfileBusy:
        return _error(409, "a profile is already being recorded; try again when it ends")
    if fmt == "speedscope":
        filename = f"plugin-daemon-{os.getpid()}-{time.strftime('%Y%m%dT%H%M%S')}.speedscope.json"
        return Response(
            json.dumps(speedscope(profile)),
            media_type="application/json",
            headers={"content-disposition": f'attachment; filename="{filename}"'},
        )
    return Response(flamegraph_svg(profile), media_type="image/svg+xml")
