"""Judging a design's load run from locust's CSV stats, and the comparison report with plots.

Judging is strict so that a run cannot hide a failure: every scenario must have run,
every failure must be one its design explains (only ``lock`` and ``unsafe`` may give
wrong verdicts: that race is what they are kept to show), locust itself must have
raised nothing, and the crashed plugin must have been restarted.
"""

from __future__ import annotations

import itertools
from collections import defaultdict
from collections.abc import Iterable
from pathlib import Path

from loadtest.harness import (
    CRASHPROTO,
    SCENARIOS,
    WRONG_VERDICTS_EXPECTED,
    DesignRun,
    Load,
    read_csv,
)

INVOCATION = "POST"  # the locust entry type that carries each invocation's outcome
PERCENTILES = ("50%", "95%", "99%")
PLOTTED_SCENARIOS = ("fastproto emit", "sdk word_stats", "slow reader")


def _stats(run: DesignRun) -> list[dict[str, str]]:
    return read_csv(run.csv_prefix.with_name(run.csv_prefix.name + "_stats.csv"))


def _history(run: DesignRun) -> list[dict[str, str]]:
    return read_csv(run.csv_prefix.with_name(run.csv_prefix.name + "_stats_history.csv"))


def _failures(run: DesignRun) -> list[dict[str, str]]:
    return read_csv(run.csv_prefix.with_name(run.csv_prefix.name + "_failures.csv"))


def _exceptions(run: DesignRun) -> list[dict[str, str]]:
    return read_csv(run.csv_prefix.with_name(run.csv_prefix.name + "_exceptions.csv"))


def failure_counts(run: DesignRun) -> tuple[int, int]:
    """(wrong verdicts, every other failure) of a run."""
    verdicts = other = 0
    for row in _failures(run):
        n = int(row["Occurrences"])
        if row["Error"].startswith("WrongVerdict("):
            verdicts += n
        else:
            other += n
    return verdicts, other


def judge(run: DesignRun) -> None:
    """Append to ``run.problems`` every way the load run went wrong."""
    rows = {r["Name"]: r for r in _stats(run) if r["Type"] == INVOCATION}
    if not rows:
        run.problems.append("no invocation was recorded (no locust stats)")
        return
    for scenario in SCENARIOS:
        if int(rows.get(scenario, {}).get("Request Count", 0)) == 0:
            run.problems.append(f"scenario {scenario!r} never ran")
    for row in _failures(run):
        wrong_verdict = row["Error"].startswith("WrongVerdict(")
        if wrong_verdict and run.design in WRONG_VERDICTS_EXPECTED:
            continue
        run.problems.append(f"{row['Occurrences']} x {row['Name']}: {row['Error'][:300]}")
    for row in _exceptions(run):
        run.problems.append(f"locust user code raised {row['Count']} x {row['Message'][:300]}")
    crashes = int(rows.get("crashproto crash", {}).get("Request Count", 0))
    if run.plugins and crashes and not run.plugins.get(CRASHPROTO, {}).get("restarts"):
        run.problems.append(f"{CRASHPROTO} was crashed {crashes} times but never restarted")


def _ms(value: str) -> str:
    return "-" if value in ("", "N/A") else f"{float(value):.0f}"


def _mib(n: int) -> str:
    return f"{n / 2**20:.0f}"


def summary_rows(runs: Iterable[DesignRun]) -> list[list[str]]:
    table = []
    for run in runs:
        stats = _stats(run)
        invocations = [r for r in stats if r["Type"] == INVOCATION]
        count = sum(int(r["Request Count"]) for r in invocations)
        rate = sum(float(r["Requests/s"]) for r in invocations)
        verdicts, other = failure_counts(run)
        ttfe = next((r for r in stats if r["Type"] == "TTFE" and r["Name"] == "fastproto emit"), {})
        rss = [s.rss for s in run.samples] or [0]
        fds = [s.fds for s in run.samples] or [0]
        table.append(
            [
                run.design,
                str(count),
                f"{rate:.0f}",
                str(verdicts),
                str(other),
                " / ".join(_ms(ttfe.get(p, "")) for p in PERCENTILES),
                f"{_mib(rss[0])} / {_mib(max(rss))} / {_mib(rss[-1])}",
                f"{fds[0]} / {max(fds)} / {fds[-1]}",
                str(run.plugins.get(CRASHPROTO, {}).get("restarts", "-")),
                "yes" if not run.problems else "NO",
            ]
        )
    return table


def _markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(" --- " for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def scenario_rows(runs: list[DesignRun]) -> list[list[str]]:
    """Per scenario and design: invocations, failures, TTFE p50 / p99."""
    by_design = {
        run.design: {(r["Type"], r["Name"]): r for r in _stats(run) if r["Name"] != "Aggregated"}
        for run in runs
    }
    rows = []
    for scenario in SCENARIOS:
        row = [scenario]
        for run in runs:
            post = by_design[run.design].get((INVOCATION, scenario), {})
            ttfe = by_design[run.design].get(("TTFE", scenario), {})
            row.append(
                f"{post.get('Request Count', 0)} / {post.get('Failure Count', 0)} / "
                f"{_ms(ttfe.get('50%', ''))} / {_ms(ttfe.get('99%', ''))}"
            )
        rows.append(row)
    return rows


def write_report(runs: list[DesignRun], load: Load, out: Path) -> str:
    """``report.md`` and the plots in ``out``; returns the report's text."""
    parts = [
        f"# Load test: {load.users} users (spawn rate {load.spawn_rate:g}/s), {load.run_time} s per design",
        "",
        _markdown_table(
            [
                "design",
                "invocations",
                "inv/s",
                "wrong verdicts",
                "other failures",
                "TTFE ms p50/p95/p99 (fastproto emit)",
                "daemon RSS MiB start/peak/end",
                "daemon fds start/peak/end",
                "crashproto restarts",
                "survived",
            ],
            summary_rows(runs),
        ),
        "",
        "Per scenario: invocations / failures / TTFE ms p50 / p99",
        "",
        _markdown_table(["scenario", *(r.design for r in runs)], scenario_rows(runs)),
        "",
    ]
    for run in runs:
        verdicts = [r for r in _failures(run) if r["Error"].startswith("WrongVerdict(")]
        verdicts.sort(key=lambda r: -int(r["Occurrences"]))
        if verdicts:
            parts.append(f"Wrong verdicts of `{run.design}` (the race it is kept to show), most frequent:")
            parts += [f"- {r['Occurrences']} x {r['Name']}: {r['Error'][:200]}" for r in verdicts[:5]]
            if len(verdicts) > 5:
                parts.append(f"- and {len(verdicts) - 5} more kinds")
            parts.append("")
        if run.problems:
            parts.append(f"Problems of `{run.design}`:")
            parts += [f"- {p}" for p in run.problems]
            parts.append("")
        counts = ", ".join(f"{k} {v}" for k, v in run.log_counts.items())
        parts.append(f"`{run.design}` daemon (pid {run.daemon_pid}) log: {counts}")
    parts += ["", "Plots: throughput.png, ttfe.png, failures.png", ""]
    text = "\n".join(parts)
    (out / "report.md").write_text(text)
    plot(runs, out)
    return text


def _series(run: DesignRun, column: str) -> tuple[list[float], list[float]]:
    """Seconds since the start, and the cumulative ``column`` summed over the invocation entries."""
    totals: dict[int, float] = defaultdict(float)
    for row in _history(run):
        if row["Type"] == INVOCATION:
            totals[int(row["Timestamp"])] += float(row[column])
    times = sorted(totals)
    return [t - times[0] for t in times] if times else [], [totals[t] for t in times]


def _rate(times: list[float], totals: list[float]) -> tuple[list[float], list[float]]:
    """Per-second rate between consecutive samples (distinct whole seconds) of a cumulative count."""
    steps = list(zip(times, totals, strict=True))
    pairs = list(itertools.pairwise(steps))
    return [t for _, (t, _) in pairs], [(n - n0) / (t - t0) for (t0, n0), (t, n) in pairs]


def plot(runs: list[DesignRun], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4))
    for run in runs:
        ax.plot(*_rate(*_series(run, "Total Request Count")), label=run.design)
    ax.set(xlabel="seconds", ylabel="invocations/s", title="Throughput per validator design")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "throughput.png", dpi=100)
    plt.close(fig)

    fig, axes = plt.subplots(1, len(PLOTTED_SCENARIOS), figsize=(12, 4), sharey=False)
    width = 0.8 / max(len(runs), 1)
    for ax, scenario in zip(axes, PLOTTED_SCENARIOS, strict=True):
        for i, run in enumerate(runs):
            row = next((r for r in _stats(run) if r["Type"] == "TTFE" and r["Name"] == scenario), {})
            values = [float(row[p]) if row.get(p, "N/A") != "N/A" else 0.0 for p in PERCENTILES]
            ax.bar([x + i * width for x in range(len(PERCENTILES))], values, width, label=run.design)
        ax.set_xticks([x + width * (len(runs) - 1) / 2 for x in range(len(PERCENTILES))], PERCENTILES)
        ax.set(title=f"TTFE: {scenario}", ylabel="ms")
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(out / "ttfe.png", dpi=100)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(8, 4))
    for run in runs:
        ax.plot(*_series(run, "Total Failure Count"), label=run.design)
    ax.set(xlabel="seconds", ylabel="failed invocations (cumulative)", title="Failures per validator design")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "failures.png", dpi=100)
    plt.close(fig)
