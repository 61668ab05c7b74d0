"""CPU per invocation against events per session, for the daemon and the bare relays.

    python -m bench.cost                       # daemon (tracing off, on) and both relays
    python -m bench.cost --set tracing --baseline 'tracing on @b7c1dfc'
    python -m bench.cost --events 1 21 200 --repeats 5 --duration 3
    python -m bench.cost --set tracing --rate 300     # all at once, 300 invocations/s each
    python -m bench.cost --set steps --steps abc123 def456   # the daemon now and at earlier commits
    python -m bench.cost --set tracing-aa --patch cut.diff    # also the daemon with cut.diff applied
    python -m bench.cost --set steps --python other/.venv/bin/python   # also on another interpreter

The server's CPU is read from ``/proc`` (user + system, all its threads, not its
plugin child) around each trial; µs per invocation divides it by the invocations
the client completed. Variants run interleaved (A B C A B C ...) against servers
started once, so a shared machine's drift hits them alike; each ratio is taken
between variants of the same repeat, and the table gives the median ratio and the
range over repeats. ``name@revision`` runs the daemon as it was at a git commit.
With ``--rate`` the variants run at the same time, each at that fixed request rate:
the way to compare ablations on a shared machine (a server's CPU per invocation
depends on how busy it is, so closed-loop variants at different throughputs are
not quite comparable).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import tempfile
from pathlib import Path
from typing import Any

from bench.loadgen import request_bytes, run_load
from bench.measure import INVOKE_PATH, Workload, trial
from bench.servers import (
    PYTHON_BACKEND,
    Server,
    Variant,
    daemon_variant,
    interpreter_variant,
    patched_variant,
    prepare_environment,
    source_variant,
)
from bench.sweeps import RELAY_FAST, RELAY_JSON

VARIABLES = 4  # per session, as the other sweeps; fewer when the session is shorter


def workload(events: int, concurrency: int) -> Workload:
    """``events`` SSE events per invocation: messages, variables and the final ``done``."""
    variables = min(VARIABLES, events - 1)
    return Workload(size=16, count=events - 1 - variables, variables=variables, concurrency=concurrency)


def variant_set(
    name: str,
    revision: str | None,
    steps: list[str] | None = None,
    patches: list[str] | None = None,
    pythons: list[str] | None = None,
) -> list[Variant]:
    variants = {
        # The daemon now and at each of ``steps`` (tracing off), and the fast relay.
        "steps": [
            RELAY_FAST,
            daemon_variant("daemon"),
            *(source_variant(f"daemon @{step}", step) for step in steps or []),
        ],
        "relay": [
            RELAY_FAST,
            RELAY_JSON,
            # The daemon as shipped: the owner design on the jsonschema-rs backend (the default).
            daemon_variant("daemon owner"),
            daemon_variant("daemon owner traced", tracing=True),
            # What the schema check costs: the same daemon without it, and with pure-Python jsonschema.
            daemon_variant("daemon none", validator="none"),
            daemon_variant("daemon owner py", backend=PYTHON_BACKEND),
            # The same daemon with dispatch served through the ASGI application.
            Variant(
                "daemon owner asgi",
                "daemon",
                daemon_variant("").settings | {"server_direct_dispatch": "false"},
            ),
        ],
        "tracing": [
            daemon_variant("tracing off"),
            daemon_variant("tracing on", tracing=True),
        ],
        "tracing-aa": [
            daemon_variant("tracing off"),
            daemon_variant("tracing off (A/A)"),
            daemon_variant("tracing on", tracing=True),
        ],
    }[name]
    if revision:
        variants += [
            source_variant(f"tracing off @{revision}", revision),
            source_variant(f"tracing on @{revision}", revision, tracing=True),
        ]
    variants += [interpreter_variant(python) for python in pythons or []]
    for spec in patches or []:  # each a diff, or diffs joined by "+" applied in order
        files = [Path(p) for p in spec.split("+")]
        variants.append(patched_variant(f"patched {'+'.join(f.stem for f in files)}", files))
    return variants


async def _together(
    servers: list[Server], load: Workload, duration: float, rate: float
) -> list[dict[str, Any]]:
    """Every server under the same fixed request rate at the same time; CPU from /proc around it."""
    requests = [request_bytes("127.0.0.1", s.port, INVOKE_PATH, s.headers, load.body()) for s in servers]
    processes = [s.process for s in servers]
    before = [p.cpu_times() for p in processes]
    loads = await asyncio.gather(
        *(
            run_load("127.0.0.1", s.port, r, concurrency=load.concurrency, duration=duration, rate=rate)
            for s, r in zip(servers, requests, strict=True)
        )
    )
    after = [p.cpu_times() for p in processes]
    out = []
    for done, b, a in zip(loads, before, after, strict=True):
        cpu = (a.user - b.user) + (a.system - b.system)
        out.append(
            {
                "invocations": done.invocations,
                "invocations_per_s": done.invocations / done.elapsed,
                "cpu_s": cpu,
                "outcomes": dict(done.outcomes),
            }
        )
    return out


def run(
    variants: list[Variant],
    events: list[int],
    *,
    repeats: int,
    duration: float,
    warmup: float,
    concurrency: int,
    rate: float | None = None,
) -> list[dict[str, Any]]:
    """Closed-loop trials, one variant after another (A B C A B C ...); with ``rate``, all
    variants at once at that many invocations/s each, so drift hits them alike and each relays
    the same load (a server's CPU per invocation depends on how busy it is)."""
    import uvloop

    trials: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="bench-cost-") as tmp:
        servers = [Server(v, Path(tmp) / str(i)) for i, v in enumerate(variants)]
        try:
            for server in servers:
                server.start()
            for n in events:
                load = workload(n, concurrency)
                if rate:
                    uvloop.run(_together(servers, load, warmup, rate))
                for repeat in range(repeats):
                    if rate:
                        results = uvloop.run(_together(servers, load, duration, rate))
                    else:
                        results = [trial(server, load, duration, warmup) for server in servers]
                    for server, result in zip(servers, results, strict=True):
                        per = result["cpu_s"] / max(result["invocations"], 1) * 1e6
                        row = {"session_events": n, "variant": server.variant.name, "repeat": repeat}
                        trials.append(row | {"cpu_us_per_invocation": per, **result})
                        print(
                            f"  {n:>4} events {server.variant.name:<26} r{repeat} {per:8.1f} µs/inv  "
                            f"{result['invocations_per_s']:7.0f} inv/s  {result['outcomes']}",
                            flush=True,
                        )
        finally:
            for server in servers:
                server.stop()
    return trials


def table(trials: list[dict[str, Any]], baseline: str) -> str:
    """Median µs per invocation, and same-repeat ratios to ``baseline`` (median [min-max])."""
    variants = list(dict.fromkeys(t["variant"] for t in trials))
    lines = [
        "| events | variant | CPU µs/invocation | CPU ratio to " + baseline + " | invocations/s ratio |",
        "| --- | --- | --- | --- | --- |",
    ]
    for n in sorted({t["session_events"] for t in trials}):
        at = [t for t in trials if t["session_events"] == n]
        base = {t["repeat"]: t for t in at if t["variant"] == baseline}
        for v in variants:
            mine = [t for t in at if t["variant"] == v]
            cpu = statistics.median(t["cpu_us_per_invocation"] for t in mine)
            cells = []
            for key in ("cpu_us_per_invocation", "invocations_per_s"):
                ratios = sorted(t[key] / base[t["repeat"]][key] for t in mine if t["repeat"] in base)
                cells.append(
                    f"{statistics.median(ratios):.3f} [{ratios[0]:.3f}-{ratios[-1]:.3f}]" if ratios else "-"
                )
            lines.append(f"| {n} | {v} | {cpu:.0f} | {cells[0]} | {cells[1]} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--set", choices=["relay", "tracing", "tracing-aa", "steps"], default="relay")
    parser.add_argument("--revision", help="also run the daemon at this git commit (tracing off and on)")
    parser.add_argument("--steps", nargs="*", help="with --set steps: git commits to compare with")
    parser.add_argument(
        "--patch",
        action="append",
        help="also run the committed daemon with this diff applied (tracing off; a+b: both, in order)",
    )
    parser.add_argument(
        "--python",
        action="append",
        help="also run the daemon on this interpreter (a venv's python with the daemon's dependencies)",
    )
    parser.add_argument("--baseline", help="the variant ratios are taken to (default: the first)")
    parser.add_argument("--events", type=int, nargs="*", default=[1, 21, 200])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--duration", type=float, default=3.0)
    parser.add_argument("--warmup", type=float, default=0.5)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument(
        "--rate", type=float, help="run the variants at once, each at this many invocations/s (ablations)"
    )
    parser.add_argument("--json", type=Path, help="write every trial here")
    args = parser.parse_args()
    prepare_environment()
    variants = variant_set(args.set, args.revision, args.steps, args.patch, args.python)
    trials = run(
        variants,
        args.events,
        repeats=args.repeats,
        duration=args.duration,
        warmup=args.warmup,
        concurrency=args.concurrency,
        rate=args.rate,
    )
    if args.json:
        args.json.write_text(json.dumps(trials, indent=1))
    print(table(trials, args.baseline or variants[0].name))


if __name__ == "__main__":
    main()
