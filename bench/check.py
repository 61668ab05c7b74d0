"""CI's verdict on a benchmark run: broken benchmarks and ratio regressions, never absolute times.

A ratio between two variants measured in the same run (A B A B, same machine, same
minute) cancels most of a shared machine's noise; the spread of the per-repeat
ratios measures what is left. A check fails only when the median ratio is beyond
its reference (``bench/ci_reference.json``, from the full run in REPORT.md) by
more than ``max(1.5, 1 + 4 * spread)``: far outside the noise of this very run.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

REFERENCE = Path(__file__).with_name("ci_reference.json")
FLOOR = 1.5
NOISE_FACTOR = 4.0

# (sweep, metric, a, b, invert): the ratio a/b must not grow; invert when a higher b is worse.
CHECKS: list[tuple[str, str, str, str, bool]] = [
    ("relay", "cpu_us_per_event", "daemon orjson none", "relay orjson+coalesce", False),
    ("relay", "cpu_us_per_event", "daemon json none", "relay json", False),
    ("relay", "cpu_us_per_event", "daemon orjson owner", "daemon orjson none", False),
    ("validator", "cpu_us_per_event", "owner", "none", False),
    ("tracing", "cpu_us_per_event", "tracing on", "tracing off", False),
]


def limit(reference: float, spread: float) -> float:
    return reference * max(FLOOR, 1 + NOISE_FACTOR * spread)


def measured(results: dict[str, Any]) -> list[dict[str, Any]]:
    """Every checked ratio this run measured: name, median and spread of the per-repeat ratios."""
    rows = []
    sweeps = {r["name"]: r for r in results["sweeps"]}
    for sweep, metric, a, b, invert in CHECKS:
        if sweep not in sweeps:
            continue
        for ratio in sweeps[sweep]["summary"]["ratios"]:
            if (ratio["metric"], ratio["a"], ratio["b"]) != (metric, a, b):
                continue
            values = sorted(1 / v for v in ratio["per_repeat"]) if invert else sorted(ratio["per_repeat"])
            median = values[len(values) // 2]
            pair = f"{b} / {a}" if invert else f"{a} / {b}"
            rows.append(
                {
                    "name": f"{sweep}: {metric} {pair} @ {ratio['point']}",
                    "median": median,
                    "spread": (values[-1] - values[0]) / median,
                }
            )
    return rows


def evaluate(results: dict[str, Any], reference: dict[str, float]) -> tuple[list[str], list[str]]:
    """(report lines, failures); a ratio without a reference is reported, never failed."""
    lines, failures = [], []
    for row in measured(results):
        name, median, spread = row["name"], row["median"], row["spread"]
        ref = reference.get(name)
        if ref is None:
            lines.append(f"  {name}: {median:.3f} (spread {spread:.0%}; no reference)")
            continue
        bound = limit(ref, spread)
        verdict = "ok" if median <= bound else "REGRESSION"
        lines.append(
            f"  {name}: {median:.3f} (spread {spread:.0%}) "
            f"vs reference {ref:.3f}, limit {bound:.3f}: {verdict}"
        )
        if median > bound:
            failures.append(name)
    return lines, failures


def reference_from(results: dict[str, Any]) -> dict[str, float]:
    """The reference ratios of a full run (what ``--write-reference`` stores)."""
    return {row["name"]: round(row["median"], 4) for row in measured(results)}


def load_reference() -> dict[str, float]:
    return json.loads(REFERENCE.read_text()) if REFERENCE.exists() else {}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("run", type=Path, help="a run directory with results.json")
    parser.add_argument("--write-reference", action="store_true", help="store its ratios as CI's reference")
    args = parser.parse_args()
    results = json.loads((args.run / "results.json").read_text())
    if args.write_reference:
        REFERENCE.write_text(json.dumps(reference_from(results), indent=1, sort_keys=True) + "\n")
        print(f"reference ratios written to {REFERENCE}")
    lines, failures = evaluate(results, load_reference())
    print("\n".join(lines))
    raise SystemExit(1 if failures else 0)


if __name__ == "__main__":
    main()
