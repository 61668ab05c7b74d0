"""The share of the daemon's CPU spent on serialization, by message size and codec.

    python -m bench.serialization                        # orjson and json; 16 B .. 64 KiB
    python -m bench.serialization --sizes 16 1024 --events 21 --duration 4

The daemon times every plugin line it decodes and every event it encodes
(``plugin_serialization_seconds_total``, read from ``/metrics`` around each trial);
divided by the server's CPU over the same trial (from ``/proc``), that is the share.
Both are from the same process in the same trial, so drift between trials does not
enter the ratio; the timers are wall-clock, so a thread preempted mid-encode on a
busy machine inflates them (the share is an upper bound there).
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path
from typing import Any

import httpx

from bench.measure import Workload, trial
from bench.servers import Server, daemon_variant, prepare_environment


def serialization_seconds(server: Server) -> float:
    text = httpx.get(f"http://127.0.0.1:{server.port}/metrics", headers=server.headers, timeout=30).text
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("plugin_serialization_seconds_total{")
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--codecs", nargs="*", default=["orjson", "json"])
    parser.add_argument("--sizes", type=int, nargs="*", default=[16, 1024, 16384, 65536])
    parser.add_argument("--events", type=int, default=21, help="per session: messages + 4 variables + done")
    parser.add_argument("--duration", type=float, default=3.0)
    args = parser.parse_args()
    prepare_environment()
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="bench-serialization-") as tmp:
        for codec in args.codecs:
            server = Server(daemon_variant(f"daemon {codec}", codec=codec), Path(tmp) / codec)
            server.start()
            try:
                for size in args.sizes:
                    load = Workload(size=size, count=args.events - 5, variables=4)
                    trial(server, load, 0.5, 0.0)  # warm-up
                    before = serialization_seconds(server)
                    result = trial(server, load, args.duration, 0.0)
                    spent = serialization_seconds(server) - before
                    row = {
                        "codec": codec,
                        "size": size,
                        "cpu_us_per_invocation": result["cpu_s"] / max(result["invocations"], 1) * 1e6,
                        "serialization_share": spent / result["cpu_s"] if result["cpu_s"] else 0.0,
                    }
                    rows.append(row)
                    print(row, flush=True)
            finally:
                server.stop()
    print("| codec | message size | daemon CPU µs/invocation | serialization share of the daemon's CPU |")
    print("| --- | --- | --- | --- |")
    for row in rows:
        print(
            f"| {row['codec']} | {row['size']} B | {row['cpu_us_per_invocation']:.0f} "
            f"| {100 * row['serialization_share']:.1f}% |"
        )


if __name__ == "__main__":
    main()
