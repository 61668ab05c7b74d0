"""``python -m loadtest``: locust against a fresh daemon per validator design, then a report.

Exits non-zero when any design's daemon did not come through whole, a scenario never
ran, or any invocation failed in a way its design does not explain (see
:mod:`loadtest.report`).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

from loadtest.harness import DESIGNS, Load, make_plugins, run_design
from loadtest.report import judge, write_report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loadtest", description=__doc__)
    parser.add_argument("--designs", nargs="+", choices=DESIGNS, default=list(DESIGNS))
    parser.add_argument("--users", type=int, default=16)
    parser.add_argument("--spawn-rate", type=float, default=16)
    parser.add_argument("--run-time", type=int, default=60, help="seconds of load per design")
    parser.add_argument(
        "--ci", action="store_true", help="the short run CI does: 20 s per design (overrides --run-time)"
    )
    parser.add_argument("--out", type=Path, default=Path("loadtest/results"))
    args = parser.parse_args(argv)
    load = Load(args.users, args.spawn_rate, 20 if args.ci else args.run_time)
    out = (args.out / time.strftime("%Y%m%dT%H%M%S")).resolve()
    out.mkdir(parents=True)
    # Restart the crashed plugin quickly, so the Crasher users keep crashing it during the run.
    env = {"plugin_restart_backoff_max": 1}
    runs = []
    with tempfile.TemporaryDirectory(prefix="loadtest-") as tmp:
        plugins = make_plugins(Path(tmp))
        for design in args.designs:
            print(f"loadtest: {design}: {load.users} users for {load.run_time} s", flush=True)
            run = run_design(design, load, plugins, out, env=env)
            judge(run)
            runs.append(run)
            print(f"loadtest: {design}: {'OK' if not run.problems else 'FAILED'}", flush=True)
    report = write_report(runs, load, out)
    print(report, flush=True)
    print(f"written to {out}", flush=True)
    failed = [r.design for r in runs if r.problems]
    if failed:
        print(f"loadtest: FAILED: {', '.join(failed)}", flush=True)
    print(f"loadtest: {len(runs) - len(failed)} passed, {len(failed)} failed", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
