"""The benchmark harness's own logic: SSE response parsing, CI's ratio verdicts, CPU attribution.

A benchmark that measures something else than it says is a defect, so the parts
that turn bytes and samples into figures are checked on inputs with known answers.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

from bench import check, profile
from bench.loadgen import _Response, outcome, percentile

EVENTS = [b'data: {"code":0,"data":"%s"}\n\n' % c for c in (b"a", b"b", b"c")]


def chunk(body: bytes) -> bytes:
    return b"%x\r\n" % len(body) + body + b"\r\n"


RESPONSE = (
    b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n"
    + chunk(EVENTS[0])
    + chunk(EVENTS[1] + EVENTS[2])
    + b"0\r\n\r\n"
)


def parse_in_pieces(size: int) -> tuple[_Response, bytes]:
    async def main() -> tuple[_Response, bytes]:
        response = _Response()
        left = b""
        for i in range(0, len(RESPONSE), size):
            left = response.feed(RESPONSE[i : i + size])
        await asyncio.wait_for(response.done, 1)
        return response, left

    return asyncio.run(main())


def test_a_chunked_sse_response_parses_the_same_whatever_the_read_sizes() -> None:
    for size in (1, 2, 3, 7, 64, len(RESPONSE)):
        response, left = parse_in_pieces(size)
        assert left == b""
        assert bytes(response.body) == b"".join(EVENTS)
        assert outcome(response.body) == "ok"


def test_outcome_names_the_error_type_of_the_last_event() -> None:
    inner = json.dumps({"message": "m", "error_type": "ToolOutputValidationError", "args": {}})
    body = b"data: " + json.dumps({"code": -500, "message": inner, "data": None}).encode() + b"\n\n"
    assert outcome(body) == "ToolOutputValidationError"
    assert percentile([3.0, 1.0, 2.0, 4.0], 50) == 2.0
    assert percentile([3.0, 1.0, 2.0, 4.0], 99) == 4.0


def results_with(per_repeat: list[float]) -> dict[str, Any]:
    ratio = {
        "metric": "cpu_us_per_event",
        "a": "daemon orjson none",
        "b": "relay orjson+coalesce",
        "point": "16B",
        "per_repeat": per_repeat,
    }
    return {"sweeps": [{"name": "relay", "summary": {"ratios": [ratio]}}]}


def test_ci_fails_only_far_outside_the_reference_and_the_runs_own_noise() -> None:
    name = "relay: cpu_us_per_event daemon orjson none / relay orjson+coalesce @ 16B"
    reference = {name: 2.0}
    assert check.evaluate(results_with([2.1, 2.9, 2.5]), reference)[1] == []  # within 1.5x
    assert check.evaluate(results_with([3.2, 3.3, 3.4]), reference)[1] == [name]  # 1.65x, quiet run
    assert check.evaluate(results_with([1.5, 3.3, 4.0]), reference)[1] == []  # same median, noisy run
    assert check.evaluate(results_with([9.0, 9.0, 9.0]), {})[1] == []  # no reference: report only
    assert check.reference_from(results_with([1.0, 2.0, 3.0])) == {name: 2.0}


def write_speedscope(path: Path, frames: list[dict[str, Any]], threads: dict[str, list[list[int]]]) -> None:
    profiles = [{"type": "sampled", "name": name, "samples": samples} for name, samples in threads.items()]
    path.write_text(json.dumps({"shared": {"frames": frames}, "profiles": profiles}))


def test_attribution_charges_a_blocked_thread_only_the_cpu_it_used(tmp_path: Path) -> None:
    """Samples in a blocking call get what is left of the thread's kernel-accounted CPU."""
    json_decoder = {
        "name": "JSONDecoder.raw_decode",
        "file": "/usr/lib/python3.11/json/decoder.py",
        "line": 1,
    }
    loop = {"name": "Runner.run", "file": "/usr/lib/python3.11/asyncio/runners.py", "line": 118}
    frames = [loop, json_decoder]
    speedscope = tmp_path / "p.speedscope.json"
    # 100 samples at 100 Hz: 40 decoding (0.4 s), 60 in the loop's blocking run.
    write_speedscope(speedscope, frames, {'Thread 7 "MainThread"': [[0, 1]] * 40 + [[0]] * 60})
    assert profile.attribute(speedscope, None, rate=100) == {"JSON decode": 40, "event loop": 60}
    cpu = profile.attribute(speedscope, {7: 0.5}, rate=100)
    assert abs(cpu["JSON decode"] - 0.4) < 1e-9 and abs(cpu["event loop"] - 0.1) < 1e-9
    cpu = profile.attribute(speedscope, {7: 0.2}, rate=100)  # fewer CPU seconds than busy samples
    assert abs(cpu["JSON decode"] - 0.2) < 1e-9 and cpu["event loop"] == 0


def test_the_daemons_hot_lines_are_recognised_by_their_source(tmp_path: Path) -> None:
    source = tmp_path / "daemon" / "runtime.py"
    source.parent.mkdir()
    source.write_text("def _handle_lines(self):\n    obj = loads(line)\n    kind = obj.get('x')\n")
    decode = {"name": "PluginInstance._handle_lines", "file": str(source), "line": 2}
    routing = {"name": "PluginInstance._handle_lines", "file": str(source), "line": 3}
    assert profile.categorize(decode) == "JSON decode"
    assert profile.categorize(routing) == "other"
    assert profile.categorize({"name": "send", "file": str(source), "line": 2}) == "request handling"


def test_cost_workloads_have_the_events_per_session_asked_for() -> None:
    from bench.cost import workload

    for events in (1, 2, 21, 200):
        load = workload(events, 16)
        assert load.events_per_invocation == events and load.count >= 0 and load.variables >= 0


def test_cost_table_takes_ratios_within_each_repeat() -> None:
    from bench.cost import table

    trials = [
        {"session_events": 1, "variant": v, "repeat": r}
        | {"cpu_us_per_invocation": cpu, "invocations_per_s": ips}
        for v, r, cpu, ips in (
            ("base", 0, 100.0, 1000.0),
            ("base", 1, 200.0, 500.0),  # a slow repeat: the other variant was slow too
            ("other", 0, 150.0, 800.0),
            ("other", 1, 300.0, 400.0),
        )
    ]
    rows = table(trials, "base").splitlines()
    assert rows[-1] == "| 1 | other | 225 | 1.500 [1.500-1.500] | 0.800 [0.800-0.800] |"


def test_a_patched_variant_serves_the_committed_daemon_with_the_patch_applied(tmp_path: Path) -> None:
    """An ablation must run the patched code, not the working tree's: the patch here is visible
    in the health check's version."""
    import httpx

    from bench.servers import Server, patched_variant

    patch = tmp_path / "version.diff"
    patch.write_text(
        "--- a/daemon/__init__.py\n+++ b/daemon/__init__.py\n@@ -2,2 +2,2 @@\n \n"
        '-__version__ = "0.1.0"\n+__version__ = "0.1.0+patched"\n'
    )
    server = Server(patched_variant("patched", [patch]), tmp_path / "server")
    server.start()
    try:
        health = httpx.get(f"http://127.0.0.1:{server.port}/health/check", timeout=10).json()
    finally:
        server.stop()
    assert health["version"] == "0.1.0+patched"
