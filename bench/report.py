"""Tables (markdown) and plots (PNG) from a run's ``results.json``.

python -m bench.report bench/results/<run>          # rewrite summary.md and plots/
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from bench.profile import CATEGORIES, SERIALIZATION, attribute, shares

MiB = 1024 * 1024
COLUMNS = [
    ("events/s", "events_per_s", "{:,.0f}"),
    ("invocations/s", "invocations_per_s", "{:,.0f}"),
    ("CPU µs/event", "cpu_us_per_event", "{:.2f}"),
    ("server cores", "cpu_share", "{:.2f}"),
    ("of it kernel", "cpu_system_share", "{:.0%}"),
    ("plugin cores", "plugin_cpu_share", "{:.2f}"),
    ("client cores", "client_cpu_share", "{:.2f}"),
    ("TTFE p50 ms", "ttfe_p50_ms", "{:.2f}"),
    ("TTFE p99 ms", "ttfe_p99_ms", "{:.2f}"),
    ("peak RSS MiB", "rss_peak_bytes", "{:.1f}"),
]


def _cell(metric: str, fmt: str, value: float | None) -> str:
    if value is None:
        return "-"
    if metric == "rss_peak_bytes":
        value = value / MiB
    return fmt.format(value)


def sweep_tables(sweep: dict[str, Any]) -> str:
    medians = sweep["summary"]["medians"]
    out = [f"### {sweep['name']}: {sweep['question']}", ""]
    out.append("| point | variant | " + " | ".join(c[0] for c in COLUMNS) + " | outcomes |")
    out.append("|" + " --- |" * (len(COLUMNS) + 3))
    for point, variants in medians.items():
        for variant, values in variants.items():
            outcomes: dict[str, int] = {}
            for t in sweep["trials"]:
                if t["point"] == point and t["variant"] == variant:
                    for k, v in t["outcomes"].items():
                        outcomes[k] = outcomes.get(k, 0) + v
            cells = " | ".join(_cell(m, f, values.get(m)) for _, m, f in COLUMNS)
            shown = ", ".join(f"{k} {v}" for k, v in sorted(outcomes.items()))
            out.append(f"| {point} | {variant} | {cells} | {shown} |")
    out += ["", "Same-run ratios (median of per-repeat ratios, [min, max]):", ""]
    out.append("| metric | a / b | point | median | min | max |")
    out.append("| --- | --- | --- | ---: | ---: | ---: |")
    for r in sweep["summary"]["ratios"]:
        out.append(
            f"| {r['metric']} | {r['a']} / {r['b']} | {r['point']} | "
            f"**{r['median']:.3f}** | {r['min']:.3f} | {r['max']:.3f} |"
        )
    return "\n".join(out) + "\n"


def _grouped_bars(ax: Any, sweep: dict[str, Any], metric: str, scale: float = 1.0) -> None:
    medians = sweep["summary"]["medians"]
    points = list(medians)
    variants = list(sweep["variants"])
    width = 0.8 / len(variants)
    for i, variant in enumerate(variants):
        values = [medians[p][variant].get(metric, 0) * scale for p in points]
        ax.bar([x + i * width for x in range(len(points))], values, width, label=variant)
    ax.set_xticks([x + width * (len(variants) - 1) / 2 for x in range(len(points))], points)
    ax.grid(axis="y", alpha=0.3)


def _save(fig: Any, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_sweep(sweep: dict[str, Any], out: Path) -> list[Path]:
    if sweep["name"] == "concurrency":
        medians = sweep["summary"]["medians"]
        points = list(medians)
        fig, axes = plt.subplots(1, 3, figsize=(15, 4))
        for n, variant in enumerate(sweep["variants"]):
            color = f"C{n}"
            for ax, metric, label, scale in (
                (axes[0], "events_per_s", "events/s", 1.0),
                (axes[1], "ttfe_p99_ms", "TTFE p99 (ms), dashed p50", 1.0),
                (axes[2], "rss_peak_bytes", "peak RSS (MiB)", 1 / MiB),
            ):
                values = [medians[p][variant][metric] * scale for p in points]
                ax.plot(points, values, marker="o", label=variant, color=color)
                ax.set_title(label)
            p50 = [medians[p][variant]["ttfe_p50_ms"] for p in points]
            axes[1].plot(points, p50, linestyle="--", marker=".", color=color)
        axes[1].set_yscale("log")
        axes[0].legend(fontsize=8)
        for ax in axes:
            ax.grid(alpha=0.3)
        return [_save(fig, out / "concurrency.png")]
    fig, axes = plt.subplots(1, 2, figsize=(14, 4.5))
    _grouped_bars(axes[0], sweep, "cpu_us_per_event")
    axes[0].set_title("server CPU µs per event (lower is better)")
    if sweep["name"] == "relay":
        axes[0].set_yscale("log")
    metric = "invocations_per_s" if sweep["name"] == "tracing" else "events_per_s"
    _grouped_bars(axes[1], sweep, metric)
    axes[1].set_title(metric.replace("_per_s", "/s") + " (higher is better)")
    if sweep["name"] == "relay":
        axes[1].set_yscale("log")
    axes[0].legend(fontsize=8)
    fig.suptitle(sweep["question"])
    return [_save(fig, out / f"{sweep['name']}.png")]


COLORS = {
    "JSON decode": "#d62728",
    "JSON encode": "#ff7f0e",
    "validation": "#9467bd",
    "locking": "#8c564b",
    "send path": "#1f77b4",
    "pipe reads": "#17becf",
    "stream hand-off": "#bcbd22",
    "request handling": "#7f7f7f",
    "event loop": "#2ca02c",
    "telemetry": "#e377c2",
    "other": "#c7c7c7",
}


def plot_attribution(profiles: dict[str, Any], out: Path) -> list[Path]:
    """One stacked bar chart per message size: a bar per server, categories stacked to 100%."""
    paths = []
    for size, targets in profiles["by_size"].items():
        fig, ax = plt.subplots(figsize=(9, 4.5))
        names = list(targets)
        bottoms = [0.0] * len(names)
        for category in CATEGORIES:
            values = [targets[n]["shares"][category] * 100 for n in names]
            ax.bar(names, values, bottom=bottoms, label=category, color=COLORS[category])
            bottoms = [b + v for b, v in zip(bottoms, values, strict=True)]
        for i, n in enumerate(names):
            serialization = sum(targets[n]["shares"][c] for c in SERIALIZATION) * 100
            ax.text(i, 101, f"ser. {serialization:.0f}%", ha="center", fontsize=8)
        ax.set_ylim(0, 108)
        ax.tick_params(axis="x", labelrotation=15)
        ax.set_ylabel("% of the server's CPU")
        ax.set_title(f"Where the server's CPU goes, {size} text messages (py-spy --nonblocking)")
        ax.legend(fontsize=7, bbox_to_anchor=(1.01, 1), loc="upper left")
        paths.append(_save(fig, out / f"attribution-{size}.png"))
    return paths


def reattribute(run: Path, profiles: dict[str, Any]) -> None:
    """Recount from the recordings, so the tables always follow the current rules."""
    for targets in profiles["by_size"].values():
        for target in targets.values():
            recording = run / target["files"]["speedscope"]
            if recording.exists() and "thread_cpu" in target:
                thread_cpu = {int(k): v for k, v in target["thread_cpu"].items()}
                cpu = attribute(recording, thread_cpu)
                target.update(cpu_s=sum(cpu.values()), cpu_by_category=dict(cpu), shares=shares(cpu))


def attribution_table(profiles: dict[str, Any]) -> str:
    head = "| size | server | CPU s | samples | " + " | ".join(CATEGORIES) + " | serialization |"
    lines = [head, "|" + " --- |" * (len(CATEGORIES) + 5)]
    for size, targets in profiles["by_size"].items():
        for name, t in targets.items():
            cells = " | ".join(f"{t['shares'][c] * 100:.1f}" for c in CATEGORIES)
            serialization = sum(t["shares"][c] for c in SERIALIZATION) * 100
            head_cells = f"| {size} | {name} | {t.get('cpu_s', 0):.2f} | {t['samples']} |"
            lines.append(f"{head_cells} {cells} | **{serialization:.1f}** |")
    return "\n".join(lines) + "\n"


def micro_table(micro: dict[str, Any]) -> str:
    """Medians per benchmark, with each group's fastest as 1.0 (pytest-benchmark's own numbers)."""
    groups: dict[str, list[dict[str, Any]]] = {}
    for bench in micro["benchmarks"]:
        groups.setdefault(bench["group"] or "", []).append(bench)
    lines = ["| group | benchmark | median µs | vs fastest | rounds |", "| --- | --- | ---: | ---: | ---: |"]
    for group, benches in sorted(groups.items()):
        fastest = min(b["stats"]["median"] for b in benches)
        for b in sorted(benches, key=lambda b: b["stats"]["median"]):
            median = b["stats"]["median"]
            lines.append(
                f"| {group} | `{b['name']}` | {median * 1e6:,.2f} | {median / fastest:.2f} | "
                f"{b['stats']['rounds']} |"
            )
    return "\n".join(lines) + "\n"


def write(run: Path) -> Path:
    results = json.loads((run / "results.json").read_text())
    plots = run / "plots"
    plots.mkdir(exist_ok=True)
    parts = [f"# Benchmark run {run.name}", "", f"Machine: {results['meta']['machine']}", ""]
    if (run / "micro.json").exists():
        parts += [
            "### micro-benchmarks (pytest-benchmark)",
            "",
            micro_table(json.loads((run / "micro.json").read_text())),
        ]
    for sweep in results.get("sweeps", []):
        plot_sweep(sweep, plots)
        parts.append(sweep_tables(sweep))
    if results.get("profiles"):
        reattribute(run, results["profiles"])
        plot_attribution(results["profiles"], plots)
        parts += ["### CPU attribution (% of the server's CPU)", "", attribution_table(results["profiles"])]
    path = run / "summary.md"
    path.write_text("\n".join(parts))
    return path


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("run", type=Path)
    print(write(parser.parse_args().run))


if __name__ == "__main__":
    main()
