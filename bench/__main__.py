"""The benchmark run: micro-benchmarks, end-to-end sweeps, flame graphs, report, CI verdict.

    python -m bench                 # the full run behind bench/REPORT.md (~20 min on 2 cores)
    python -m bench --ci            # the short run CI does (< 3 min); exits 1 only if broken
                                    # or a same-run ratio is far outside its noise

Everything lands in ``bench/results/<run>/``: ``results.json`` (every trial),
``summary.md`` (tables), ``plots/*.png``, ``profiles/*.svg`` and
``*.speedscope.json`` (open at speedscope.app), ``micro*.json`` and ``micro*.txt``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import psutil

from bench import check, profile, report
from bench.measure import Workload, trial
from bench.servers import REPO, Server, daemon_variant, prepare_environment
from bench.sweeps import RELAY_JSON, SIZES, broken, run_sweep, sweeps


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    with open("/proc/cpuinfo") as info:
        for line in info:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return (
        f"{os.cpu_count()} cores ({cpu}), {psutil.virtual_memory().total / 2**30:.0f} GiB, "
        f"shared with other engineers' test runs; Python {platform.python_version()}, {platform.system()} "
        f"{platform.release()}; load average at start {os.getloadavg()[0]:.2f}"
    )


def git_revision() -> str:
    done = subprocess.run(
        ["git", "describe", "--always", "--dirty"], cwd=REPO, capture_output=True, text=True
    )
    return done.stdout.strip() or "unknown"


def run_micro(run: Path, ci: bool) -> bool:
    """pytest-benchmark over bench/micro; the full run does it twice and compares the two."""
    base = [sys.executable, "-m", "pytest", "bench/micro", "-q", "-p", "no:cacheprovider"]
    base += [f"--benchmark-storage=file://{run / 'micro-storage'}", "--benchmark-group-by=group"]
    base += ["--benchmark-columns=min,median,mean,stddev,rounds", "--benchmark-sort=name"]
    if ci:
        base += ["--benchmark-max-time=0.05", "--benchmark-min-rounds=3"]
    passes = [("micro", ["--benchmark-autosave", f"--benchmark-json={run / 'micro.json'}"])]
    if not ci:
        passes.append(
            ("micro-compare", [f"--benchmark-json={run / 'micro-2.json'}", "--benchmark-compare=0001"])
        )
    ok = True
    for name, extra in passes:
        done = subprocess.run(base + extra, cwd=REPO, capture_output=True, text=True)
        (run / f"{name}.txt").write_text(done.stdout + done.stderr)
        print(
            f"micro-benchmarks ({name}): exit {done.returncode}, table in {run / (name + '.txt')}", flush=True
        )
        ok = ok and done.returncode == 0
    return ok


def run_profiles(run: Path, ci: bool, seconds: float, workdir: Path) -> dict[str, Any]:
    """py-spy on each server under steady load, per message size; samples attributed by category."""
    targets = [daemon_variant(f"daemon {d}", validator=d) for d in ("none", "unsafe", "lock", "owner")]
    targets.append(daemon_variant("daemon owner traced", validator="owner", tracing=True))
    targets.append(RELAY_JSON)
    sizes = SIZES
    if ci:
        targets, sizes = targets[3:4], {"16B": 16}
    out = run / "profiles"
    out.mkdir(exist_ok=True)
    by_size: dict[str, dict[str, Any]] = {label: {} for label in sizes}
    for i, variant in enumerate(targets):
        server = Server(variant, workdir / "profiles" / str(i))
        server.start()
        try:
            for label, size in sizes.items():
                load = threading.Thread(
                    target=trial, args=(server, Workload(size=size), 2 * seconds + 4, 0.0)
                )
                load.start()
                time.sleep(1.0)  # steady state first
                base = out / f"{variant.name.replace(' ', '-')}-{label}"
                recorded = profile.record(server.pid, base, seconds)
                load.join()
                cpu = profile.attribute(recorded["files"]["speedscope"], recorded["thread_cpu"])
                by_size[label][variant.name] = {
                    "cpu_s": sum(cpu.values()),
                    "samples": sum(profile.attribute(recorded["files"]["speedscope"]).values()),
                    "cpu_by_category": dict(cpu),
                    "shares": profile.shares(cpu),
                    "thread_cpu": {str(k): v for k, v in recorded["thread_cpu"].items()},
                    "files": {k: str(v.relative_to(run)) for k, v in recorded["files"].items()},
                }
                print(
                    f"  profile {variant.name:<20} {label:<6} {sum(cpu.values()):.2f} CPU s attributed",
                    flush=True,
                )
        finally:
            server.stop()
    return {"seconds": seconds, "by_size": by_size}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--ci", action="store_true", help="the short run: fewer points, 1 s trials")
    parser.add_argument("--out", type=Path, help="run directory (default bench/results/<timestamp>)")
    parser.add_argument("--repeats", type=int, help="A B A B rounds per point (default 5, CI 3)")
    parser.add_argument("--duration", type=float, help="seconds per trial (default 3, CI 1)")
    parser.add_argument(
        "--profile-seconds", type=float, help="seconds per py-spy recording (default 4, CI 1)"
    )
    parser.add_argument("--skip", nargs="*", default=[], choices=["micro", "e2e", "profiles"])
    parser.add_argument(
        "--sweeps", nargs="*", help="only these sweeps (relay, validator, concurrency, tracing)"
    )
    parser.add_argument("--write-reference", action="store_true", help="store this run's ratios for CI")
    args = parser.parse_args()
    repeats = args.repeats or (3 if args.ci else 5)
    duration = args.duration or (1.0 if args.ci else 3.0)
    warmup = 0.2 if args.ci else 0.5
    profile_seconds = args.profile_seconds or (1.0 if args.ci else 4.0)
    run = args.out or REPO / "bench" / "results" / (
        time.strftime("%Y%m%dT%H%M%S") + ("-ci" if args.ci else "")
    )
    run.mkdir(parents=True, exist_ok=True)
    prepare_environment()
    started = time.monotonic()
    results: dict[str, Any] = {
        "meta": {
            "machine": machine(),
            "revision": git_revision(),
            "ci": args.ci,
            "repeats": repeats,
            "duration_s": duration,
            "warmup_s": warmup,
            "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        },
        "sweeps": [],
    }
    print(f"benchmark run {run} ({results['meta']['machine']})", flush=True)
    problems: list[str] = []
    if "micro" not in args.skip and not run_micro(run, args.ci):
        problems.append("micro-benchmarks failed (see micro.txt)")
    with tempfile.TemporaryDirectory(prefix="bench-") as tmp:
        if "e2e" not in args.skip:
            for sweep in sweeps(args.ci):
                if args.sweeps and sweep.name not in args.sweeps:
                    continue
                print(f"sweep {sweep.name}: {sweep.question}", flush=True)
                result = run_sweep(sweep, Path(tmp), repeats=repeats, duration=duration, warmup=warmup)
                results["sweeps"].append(result)
                problems += broken(result)
                (run / "results.json").write_text(json.dumps(results, indent=1))
        if "profiles" not in args.skip:
            print("profiles (py-spy --nonblocking)", flush=True)
            results["profiles"] = run_profiles(run, args.ci, profile_seconds, Path(tmp))
    results["meta"]["seconds"] = round(time.monotonic() - started)
    (run / "results.json").write_text(json.dumps(results, indent=1))
    summary = report.write(run)
    print(f"tables: {summary}; plots: {run / 'plots'}", flush=True)
    if args.write_reference:
        check.REFERENCE.write_text(json.dumps(check.reference_from(results), indent=1, sort_keys=True) + "\n")
        print(f"reference ratios written to {check.REFERENCE}")
    lines, failures = check.evaluate(results, check.load_reference())
    print("same-run ratio checks:")
    print("\n".join(lines))
    for problem in problems:
        print(f"BROKEN: {problem}")
    for failure in failures:
        print(f"REGRESSION: {failure}")
    trials = sum(len(s["trials"]) for s in results["sweeps"])
    checks = 1 + trials + len(lines)  # the micro-benchmark suite, every trial, every ratio check
    failed = len(problems) + len(failures)
    print(f"done in {results['meta']['seconds']} s")
    print(f"bench: {checks - failed} passed, {failed} failed")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
