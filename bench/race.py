"""Stress the validator designs and count how often each breaks the correctness property.

For every design, a daemon is started on loopback and driven with concurrent
invocations. With ``--target fastproto`` (two instances of the stdlib plugin) half
of the ``emit`` calls produce a valid output (variables, streamed chunks, then
``done``), half a wrong ``done``. With ``--target sdk`` every call is the SDK
plugin's ``word_stats``, whose output is always valid. Each invocation's final
event is checked against the one verdict that is right:

* valid output      -> no error event;
* invalid output    -> ``ToolOutputValidationError`` naming ``done`` and ``type``.

Anything else is a violation: a valid output reported invalid (validated before
every variable was applied), the wrong rule reported, or a validation crash.

    python -m bench.race --invocations 2000 --concurrency 64
    python -m bench.race --target sdk --invocations 500
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

from daemon.testing import PLUGINS, SSEReader, copy_plugin, start_daemon

EXPECTED_INVALID = "output variable 'done' failed 'type': \"not-a-bool\" is not of type \"boolean\""


def classify(valid: bool, events: list[Any]) -> str:
    last = events[-1] if events else None
    if last is None:
        return "no events"
    if last.ok:
        return "correct" if valid else "invalid output passed"
    error = last.error
    if error["error_type"] == "ToolOutputValidationCrash":
        return "validation crashed"
    if error["error_type"] != "ToolOutputValidationError":
        return f"other error: {error['error_type']}"
    if valid:
        return "valid output failed"
    return "correct" if error["message"] == EXPECTED_INVALID else "wrong rule reported"


def plan(target: str, i: int, variables: int) -> tuple[bool, str, str, str, dict[str, Any]]:
    """(output is valid, plugin id, provider, tool, parameters) of invocation ``i``."""
    if target == "sdk":
        return True, "demo/text_toolkit", "text_toolkit", "word_stats", {"text": f"to be or not to be {i}"}
    valid = i % 2 == 0
    params = {"count": 1, "variables": variables, "stream_chunks": variables, "violate": not valid}
    return valid, "demo/fastproto", "fastproto", "emit", params


async def run_design(
    design: str, target: str, invocations: int, concurrency: int, variables: int, workdir: Path
) -> dict:
    (workdir / design).mkdir(parents=True)
    if target == "sdk":
        plugins, instances, plugin_id = PLUGINS, 1, "demo/text_toolkit"
    else:
        plugins, instances, plugin_id = workdir / design / "plugins", 2, "demo/fastproto"
        plugins.mkdir()
        copy_plugin("fastproto", plugins)
    daemon = start_daemon(
        plugins,
        workdir / design / "state",
        workdir / design / "daemon.log",
        validator=design,
        plugin_instances=instances,
    )
    try:
        daemon.wait_ready(plugin_id, instances=instances)
        outcomes: collections.Counter[str] = collections.Counter()
        semaphore = asyncio.Semaphore(concurrency)

        async def one(client: httpx.AsyncClient, i: int) -> None:
            valid, plugin, provider, tool, params = plan(target, i, variables)
            request = daemon.invocation(plugin, tool, params, provider)
            async with semaphore:
                reader, events = SSEReader(), []
                async with client.stream("POST", daemon.invoke_url(), **request) as response:
                    async for chunk in response.aiter_raw():
                        events += reader.feed(chunk)
            outcomes[classify(valid, events)] += 1

        started = time.perf_counter()
        limits = httpx.Limits(max_connections=concurrency)
        async with httpx.AsyncClient(timeout=120, limits=limits) as client:
            await asyncio.gather(*(one(client, i) for i in range(invocations)))
        elapsed = time.perf_counter() - started
        crashes_logged = daemon.log().count("output validation crashed")
    finally:
        daemon.stop()
    violations = invocations - outcomes["correct"]
    return {
        "design": design,
        "invocations": invocations,
        "violations": violations,
        "violation_rate": violations / invocations,
        "outcomes": dict(outcomes),
        "crashes_logged": crashes_logged,
        "seconds": round(elapsed, 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--designs", nargs="+", default=["owner", "lock", "unsafe"])
    parser.add_argument("--target", choices=["fastproto", "sdk"], default="fastproto")
    parser.add_argument("--invocations", type=int, default=2000)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument(
        "--variables", type=int, default=20, help="variables and streamed chunks per invocation"
    )
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    args = parser.parse_args()
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for design in args.designs:
            result = asyncio.run(
                run_design(design, args.target, args.invocations, args.concurrency, args.variables, Path(tmp))
            )
            results.append(result)
            print(json.dumps(result), flush=True)
    print()
    print(f"{'design':<8} {'invocations':>11} {'violations':>10} {'rate':>8}  outcomes")
    for r in results:
        print(
            f"{r['design']:<8} {r['invocations']:>11} {r['violations']:>10} {r['violation_rate']:>8.2%}  "
            f"{r['outcomes']}"
        )
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"race-{args.target}-{time.strftime('%Y%m%dT%H%M%S')}.json"
    path.write_text(json.dumps({"args": vars(args) | {"out": str(args.out)}, "results": results}, indent=2))
    print(f"\nwritten to {path}")


if __name__ == "__main__":
    main()
