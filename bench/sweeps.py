"""The end-to-end sweeps: which servers, which workloads, and the A B A B schedule.

Each sweep starts its servers once (or once per point, where a point must not
inherit another's memory), then for every point runs every variant in turn,
``repeats`` times: A B C A B C ... so slow drift of a shared machine hits all
variants alike. Ratios are taken between variants of the same repeat.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.measure import Workload, trial
from bench.servers import PYTHON_BACKEND, SHIPPED_BACKEND, Server, Variant, daemon_variant, relay_variant

DESIGNS = ("unsafe", "lock", "owner")
SIZES = {"16B": 16, "1KiB": 1024, "16KiB": 16 * 1024, "64KiB": 64 * 1024}


@dataclass
class Sweep:
    name: str
    question: str
    variants: list[Variant]
    points: dict[str, Workload]
    fresh_per_point: bool = False  # a new server per point (memory must not carry over)
    ratios: list[tuple[str, str, str]] = field(default_factory=list)  # (metric, variant a, variant b)


RELAY_JSON = relay_variant("relay json", codec="json", coalesce=False)
RELAY_FAST = relay_variant("relay orjson+coalesce", codec="orjson", coalesce=True)


def sweeps(ci: bool) -> list[Sweep]:
    """The full set, or the short CI set (two sizes, fewer variants)."""
    sizes = {k: v for k, v in SIZES.items() if not ci or k in ("16B", "64KiB")}
    relay = Sweep(
        "relay",
        "Daemon vs bare relay per message size (codec, coalesced writes)",
        [
            RELAY_JSON,
            RELAY_FAST,
            daemon_variant("daemon json none", codec="json", validator="none"),
            daemon_variant("daemon orjson none", validator="none"),
            daemon_variant("daemon orjson owner"),
        ],
        {label: Workload(size=size) for label, size in sizes.items()},
        ratios=[
            ("cpu_us_per_event", "daemon json none", "relay json"),
            ("cpu_us_per_event", "daemon orjson none", "relay orjson+coalesce"),
            ("cpu_us_per_event", "relay json", "relay orjson+coalesce"),
            ("cpu_us_per_event", "daemon orjson owner", "daemon orjson none"),
            ("cpu_us_per_event", "daemon json none", "daemon orjson none"),
        ],
    )
    designs = Sweep(
        "validator",
        "Validator design and backend (16 B texts; a short and a variable-heavy session)",
        [daemon_variant("none", validator="none")]
        + [daemon_variant(d, validator=d, backend=PYTHON_BACKEND) for d in DESIGNS]
        + [daemon_variant(f"{d} rs", validator=d, backend=SHIPPED_BACKEND) for d in DESIGNS],
        {
            "16 texts + 5 vars": Workload(size=16, count=16, variables=4),
            "1 text + 51 vars": Workload(size=16, count=1, variables=50),
        },
        ratios=[
            ("events_per_s", "lock", "owner"),
            ("cpu_us_per_event", "lock", "owner"),
            ("cpu_us_per_event", "owner", "none"),
            ("cpu_us_per_event", "owner rs", "none"),
            ("cpu_us_per_event", "lock rs", "owner rs"),
        ],
    )
    if ci:
        designs.variants = [v for v in designs.variants if v.name in ("none", "lock", "owner")]
        designs.points = {"1 text + 51 vars": designs.points["1 text + 51 vars"]}
        designs.ratios = designs.ratios[:3]
    concurrency = Sweep(
        "concurrency",
        "Concurrent sessions (1 KiB texts): throughput, time to first event, memory",
        [daemon_variant("daemon orjson owner"), RELAY_FAST],
        {f"{c} sessions": Workload(size=1024, concurrency=c) for c in (1, 16, 64, 256)},
        fresh_per_point=True,
        ratios=[("cpu_us_per_event", "daemon orjson owner", "relay orjson+coalesce")],
    )
    # Off against itself (A/A) shows the run's noise floor, against which on's cost is read.
    tracing_variants = [daemon_variant("tracing off"), daemon_variant("tracing on", tracing=True)]
    if not ci:
        tracing_variants.insert(1, daemon_variant("tracing off (A/A)"))
    tracing = Sweep(
        "tracing",
        "Tracing off (OTEL_SDK_DISABLED=true) vs on (100% sampling), daemon orjson owner",
        tracing_variants,
        {
            "2 events/invocation": Workload(size=16, count=1, variables=0),
            "21 events/invocation": Workload(size=16),
        },
        ratios=[
            ("invocations_per_s", "tracing on", "tracing off"),
            ("cpu_us_per_event", "tracing on", "tracing off"),
        ]
        + [
            (metric, "tracing off (A/A)", "tracing off")
            for metric in ("invocations_per_s", "cpu_us_per_event")
            if len(tracing_variants) == 3
        ],
    )
    if ci:
        return [relay, designs, tracing]
    return [relay, designs, concurrency, tracing]


def run_sweep(sweep: Sweep, workdir: Path, *, repeats: int, duration: float, warmup: float) -> dict[str, Any]:
    trials: list[dict[str, Any]] = []
    servers: dict[str, Server] = {}

    def start_all(tag: str) -> None:
        for i, variant in enumerate(sweep.variants):
            server = Server(variant, workdir / sweep.name / f"{tag}-{i}")
            server.start()
            servers[variant.name] = server

    def stop_all() -> None:
        for server in servers.values():
            server.stop()
        servers.clear()

    try:
        if not sweep.fresh_per_point:
            start_all("all")
        for p, (point, workload) in enumerate(sweep.points.items()):
            if sweep.fresh_per_point:
                start_all(f"point{p}")
            for repeat in range(repeats):
                for variant in sweep.variants:
                    metrics = trial(servers[variant.name], workload, duration, warmup)
                    trials.append({"point": point, "variant": variant.name, "repeat": repeat, **metrics})
                    print(
                        f"  {sweep.name:<11} {point:<22} {variant.name:<24} r{repeat} {line(metrics)}",
                        flush=True,
                    )
            if sweep.fresh_per_point:
                stop_all()
    finally:
        stop_all()
    return {
        "name": sweep.name,
        "question": sweep.question,
        "variants": {v.name: v.describe() for v in sweep.variants},
        "points": {
            k: vars(w) | {"events_per_invocation": w.events_per_invocation} for k, w in sweep.points.items()
        },
        "trials": trials,
        "summary": summarize(sweep, trials),
    }


def line(metrics: dict[str, Any]) -> str:
    """One trial, as the progress output prints it."""
    return (
        f"{metrics['events_per_s']:>9.0f} ev/s {metrics['cpu_us_per_event']:>8.2f} us/ev "
        f"{metrics['invocations_per_s']:>7.0f} inv/s ttfe p99 {metrics['ttfe_p99_ms']:.1f} ms "
        f"{metrics['outcomes']}"
    )


METRICS = (
    "events_per_s",
    "invocations_per_s",
    "cpu_us_per_event",
    "cpu_share",
    "cpu_system_share",
    "plugin_cpu_share",
    "client_cpu_share",
    "ttfe_p50_ms",
    "ttfe_p99_ms",
    "rss_peak_bytes",
)


def summarize(sweep: Sweep, trials: list[dict[str, Any]]) -> dict[str, Any]:
    """Medians per (point, variant), and same-repeat ratios with their spread."""
    medians: dict[str, dict[str, dict[str, float]]] = {}
    for point in sweep.points:
        medians[point] = {}
        for variant in sweep.variants:
            rows = [t for t in trials if t["point"] == point and t["variant"] == variant.name]
            medians[point][variant.name] = {
                m: statistics.median(r[m] for r in rows) for m in METRICS if rows and rows[0][m] is not None
            }
            medians[point][variant.name]["repeats"] = len(rows)
    ratios = []
    for metric, a, b in sweep.ratios:
        for point in sweep.points:
            per_repeat = []
            for ta in (t for t in trials if t["point"] == point and t["variant"] == a):
                tb = next(
                    t
                    for t in trials
                    if t["point"] == point and t["variant"] == b and t["repeat"] == ta["repeat"]
                )
                per_repeat.append(ta[metric] / tb[metric])
            ratios.append(
                {
                    "metric": metric,
                    "a": a,
                    "b": b,
                    "point": point,
                    "median": statistics.median(per_repeat),
                    "min": min(per_repeat),
                    "max": max(per_repeat),
                    "per_repeat": per_repeat,
                }
            )
    return {"medians": medians, "ratios": ratios}


def broken(result: dict[str, Any]) -> list[str]:
    """What makes a trial unusable: no events, or outcomes the variant cannot explain.

    ``lock`` and ``unsafe`` report wrong validation verdicts by design (the race the
    project studies), so a validation error there is data, not a broken benchmark.
    """
    problems = []
    for t in result["trials"]:
        allowed = {"ok"}
        if any(d in t["variant"] for d in ("lock", "unsafe")):
            allowed |= {"ToolOutputValidationError", "ToolOutputValidationCrash"}
        unexpected = {k: v for k, v in t["outcomes"].items() if k not in allowed}
        if t["events"] == 0 or unexpected:
            problems.append(f"{result['name']} {t['point']} {t['variant']} r{t['repeat']}: {t['outcomes']}")
        elif t["events"] != t["events_expected"] + sum(t["outcomes"].get(k, 0) for k in allowed - {"ok"}):
            problems.append(
                f"{result['name']} {t['point']} {t['variant']}: {t['events']} events, "
                f"expected {t['events_expected']}"
            )
    return problems


def elapsed_since(start: float) -> str:
    return f"{time.monotonic() - start:.0f} s"
