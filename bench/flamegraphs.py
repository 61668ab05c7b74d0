"""On-CPU flame graphs of the daemon per validator design, under steady load.

    python -m bench.flamegraphs                          # into bench/report/flamegraphs/
    python -m bench.flamegraphs --seconds 10 --size 16 --events 21

Each daemon variant (on the validator backend the daemon ships with, jsonschema-rs)
runs alone under the benchmark's closed-loop load while its
own ``/debug/profile`` records it (see ``daemon/profiling.py``): samples on
``SIGPROF``, weighted by each thread's CPU clock, so only CPU counts, not threads
waiting for a core (which py-spy counted as busy on a shared machine). Writes an
SVG and a speedscope JSON per variant, and prints how much of the server's CPU
(from ``/proc``) the samples account for.
"""

from __future__ import annotations

import argparse
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx

from bench.cost import workload
from bench.measure import trial
from bench.servers import REPO, Server, Variant, daemon_variant, prepare_environment

OUT = REPO / "bench" / "report" / "flamegraphs"


def variants() -> list[Variant]:
    """Each design on the validator backend the daemon ships with, and the owner design traced."""
    designs = [daemon_variant(f"daemon {d}", validator=d) for d in ("none", "unsafe", "lock", "owner")]
    return [*designs, daemon_variant("daemon owner traced", tracing=True)]


def record(server: Server, seconds: float, fmt: str) -> bytes:
    url = f"http://127.0.0.1:{server.port}/debug/profile"
    r = httpx.get(
        url, params={"seconds": seconds, "format": fmt}, headers=server.headers, timeout=seconds + 60
    )
    r.raise_for_status()
    return r.content


def profile(variant: Variant, workdir: Path, out: Path, *, seconds: float, events: int) -> dict[str, Any]:
    server = Server(variant, workdir)
    server.start()
    try:
        files: dict[str, Path] = {}
        load: dict[str, Any] = {}
        base = out / variant.name.replace(" ", "-")
        for fmt, suffix in (("svg", ".svg"), ("speedscope", ".speedscope.json")):
            thread = threading.Thread(
                target=lambda: load.update(trial(server, workload(events, 16), seconds + 2, 0.0))
            )
            thread.start()
            time.sleep(1.0)  # steady state first
            files[fmt] = base.with_name(base.name + suffix)
            files[fmt].write_bytes(record(server, seconds, fmt))
            thread.join()
        return {
            "files": files,
            "invocations_per_s": load.get("invocations_per_s"),
            "cpu": load.get("cpu_share"),
        }
    finally:
        server.stop()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--events", type=int, default=21, help="SSE events per invocation (16 B each)")
    args = parser.parse_args()
    prepare_environment()
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="bench-flame-") as tmp:
        for i, variant in enumerate(variants()):
            result = profile(variant, Path(tmp) / str(i), args.out, seconds=args.seconds, events=args.events)
            sizes = ", ".join(f"{p.name} {p.stat().st_size // 1024} KiB" for p in result["files"].values())
            print(
                f"{variant.name:<22} {result['invocations_per_s']:.0f} inv/s, "
                f"{result['cpu']:.2f} cores: {sizes}",
                flush=True,
            )


if __name__ == "__main__":
    main()
