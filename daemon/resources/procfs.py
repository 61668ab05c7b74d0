"""What a plugin instance's processes use, read from ``/proc``.

One read per process per sample (``stat`` and the ``fd`` directory), never a call per
invocation. An instance is its process and every descendant, or every member of its
cgroup where it has one, so a plugin that forks workers is measured whole.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

PAGE = os.sysconf("SC_PAGE_SIZE")
TICKS = os.sysconf("SC_CLK_TCK")
PROC = Path("/proc")


@dataclass(frozen=True)
class Usage:
    cpu_seconds: float  # user + system, including children already reaped
    memory_bytes: int  # resident set size, summed over the processes
    open_fds: int
    threads: int
    processes: int

    def describe(self) -> dict[str, float | int]:
        return {
            "cpu_seconds": round(self.cpu_seconds, 3),
            "memory_bytes": self.memory_bytes,
            "open_fds": self.open_fds,
            "threads": self.threads,
            "processes": self.processes,
        }


def descendants(pid: int) -> list[int]:
    """``pid`` and every process below it (``/proc/<pid>/task/<tid>/children``)."""
    found, queue = [], [pid]
    while queue:
        current = queue.pop()
        found.append(current)
        try:
            tasks = os.listdir(PROC / str(current) / "task")
        except OSError:
            continue
        for tid in tasks:
            try:
                queue += [
                    int(c) for c in (PROC / str(current) / "task" / tid / "children").read_text().split()
                ]
            except OSError:
                continue
    return found


def usage(pids: Iterable[int]) -> Usage | None:
    """The sum over ``pids``; None when none of them is left."""
    cpu, rss, fds, threads, processes = 0, 0, 0, 0, 0
    for pid in pids:
        try:
            stat = (PROC / str(pid) / "stat").read_text()
            fields = stat[stat.rindex(")") + 2 :].split()  # the name may hold spaces
            open_fds = len(os.listdir(PROC / str(pid) / "fd"))
        except (OSError, ValueError):
            continue  # exited between listing and reading
        # Fields 14-17 (utime, stime, cutime, cstime), 20 (threads), 24 (rss) of proc(5).
        cpu += int(fields[11]) + int(fields[12]) + int(fields[13]) + int(fields[14])
        threads += int(fields[17])
        rss += int(fields[21])
        fds += open_fds
        processes += 1
    if not processes:
        return None
    return Usage(cpu / TICKS, rss * PAGE, fds, threads, processes)
