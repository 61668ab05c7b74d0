"""Memory limits enforced by the kernel: a child cgroup per plugin instance.

cgroup v2 (``memory.max``) where the daemon's own cgroup has the memory controller
and may hand it to children; cgroup v1 (``memory.limit_in_bytes``) where the v1 memory
hierarchy is mounted and the daemon's group is writable. Each instance gets its own
group below the daemon's, is placed in it before its program starts (the launch
command writes its own pid into ``cgroup.procs`` and then execs), and the kernel
OOM-kills inside that group alone. Where neither works the monitor falls back to an
RSS watchdog (see :mod:`daemon.resources.monitor`).

Why not ``RLIMIT_AS``: address space is not memory. Measured on these machines, an
idle SDK plugin maps 147 MiB for 65 MiB resident, and fastproto with 32 requests in
flight maps 1.2 GiB (a stack and a malloc arena per thread) for 12 MiB resident; an
address-space limit would kill a healthy threaded plugin long before it used its
share.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import re
import signal
import time
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

log = logging.getLogger(__name__)

PREFIX = "plugin-daemon-"  # our groups: plugin-daemon-<daemon pid>-<plugin>-<slot>-<n>


class Mechanism(StrEnum):
    CGROUP_V2 = "cgroup-v2"
    CGROUP_V1 = "cgroup-v1"
    RSS = "rss-watchdog"


@dataclass(frozen=True)
class Enforcement:
    """How limits are enforced in this daemon, decided once at start-up."""

    mechanism: Mechanism
    parent: Path | None  # the cgroup instance groups are made under
    detail: str  # where, or why the kernel mechanisms are not used

    def describe(self) -> dict[str, str]:
        return {"mechanism": self.mechanism.value, "detail": self.detail}


def _mounts(mountinfo: str) -> list[tuple[str, str, str, set[str]]]:
    """(root, mount point, fs type, super options) of every cgroup mount (proc(5) mountinfo)."""
    mounts = []
    for line in mountinfo.splitlines():
        left, sep, right = line.partition(" - ")
        if not sep:
            continue
        fields, tail = left.split(), right.split()
        if len(fields) < 5 or len(tail) < 3 or tail[0] not in ("cgroup", "cgroup2"):
            continue
        mounts.append((fields[3], fields[4], tail[0], set(tail[2].split(","))))
    return mounts


def locate(mountinfo: str, proc_cgroup: str) -> dict[Mechanism, Path]:
    """The directory of this process's cgroup in the v2 hierarchy and the v1 memory hierarchy."""
    memberships: dict[str, str] = {}  # "" for v2, else the v1 controller list
    for line in proc_cgroup.splitlines():
        parts = line.split(":", 2)
        if len(parts) == 3:
            memberships[parts[1]] = parts[2]
    found: dict[Mechanism, Path] = {}
    for root, point, fstype, options in _mounts(mountinfo):
        if fstype == "cgroup2":
            own, mechanism = memberships.get(""), Mechanism.CGROUP_V2
        elif "memory" in options:
            own = next((p for c, p in memberships.items() if "memory" in c.split(",")), None)
            mechanism = Mechanism.CGROUP_V1
        else:
            continue
        if own is None or mechanism in found:
            continue
        if root != "/" and not (own == root or own.startswith(root.rstrip("/") + "/")):
            continue  # our group is not visible below this mount
        relative = own[len(root) :] if root != "/" else own
        found[mechanism] = Path(point) / relative.lstrip("/")
    return found


def _write(path: Path, value: str) -> None:
    with open(path, "w") as fh:
        fh.write(value)


def _v2_delegate(group: Path) -> None:
    """Let children of ``group`` use the memory controller.

    cgroup v2 allows no processes in a group whose children have controllers, so if the
    daemon sits in ``group`` itself it first moves into a leaf ``group/daemon``.
    """
    if "memory" in (group / "cgroup.subtree_control").read_text().split():
        return
    try:
        _write(group / "cgroup.subtree_control", "+memory")
    except OSError as exc:
        if exc.errno != errno.EBUSY:
            raise
        leaf = group / "daemon"
        leaf.mkdir(exist_ok=True)
        for pid in (group / "cgroup.procs").read_text().split():
            with contextlib.suppress(ProcessLookupError):
                _write(leaf / "cgroup.procs", pid)
        _write(group / "cgroup.subtree_control", "+memory")
        log.info("moved the daemon into %s so its cgroup can hand the memory controller to plugins", leaf)


def _probe(parent: Path, mechanism: Mechanism) -> None:
    """Make and remove a limited group: proof that instance groups can be made here."""
    probe = parent / f"{PREFIX}{os.getpid()}-probe"
    probe.mkdir(exist_ok=True)
    try:
        _write(probe / _limit_file(mechanism), str(256 * 1024 * 1024))
    finally:
        probe.rmdir()


def _limit_file(mechanism: Mechanism) -> str:
    return "memory.max" if mechanism is Mechanism.CGROUP_V2 else "memory.limit_in_bytes"


def _sweep(parent: Path) -> None:
    """Remove the empty groups a daemon that died without cleaning up left behind."""
    for child in parent.glob(f"{PREFIX}*"):
        match = re.match(rf"{PREFIX}(\d+)-", child.name)
        if match is None or int(match.group(1)) == os.getpid():
            continue
        try:
            os.kill(int(match.group(1)), 0)
            continue  # that daemon still runs
        except ProcessLookupError:
            pass
        except PermissionError:
            continue
        with contextlib.suppress(OSError):
            child.rmdir()


def detect(preference: str = "auto") -> Enforcement:
    """The first usable mechanism: cgroup v2, cgroup v1, else the RSS watchdog."""
    if preference == "rss":
        return Enforcement(Mechanism.RSS, None, "chosen by PLUGIN_MEMORY_MECHANISM=rss")
    try:
        places = locate(Path("/proc/self/mountinfo").read_text(), Path("/proc/self/cgroup").read_text())
    except OSError as exc:
        return Enforcement(Mechanism.RSS, None, f"cgroups not readable: {exc}")
    reasons = []
    v2 = places.get(Mechanism.CGROUP_V2)
    if v2 is not None:
        try:
            if "memory" not in (v2 / "cgroup.controllers").read_text().split():
                raise OSError(f"no memory controller in {v2}")
            _v2_delegate(v2)
            _probe(v2, Mechanism.CGROUP_V2)
            _sweep(v2)
            return Enforcement(Mechanism.CGROUP_V2, v2, f"memory.max of a group per instance under {v2}")
        except OSError as exc:
            reasons.append(f"cgroup v2: {exc}")
    v1 = places.get(Mechanism.CGROUP_V1)
    if v1 is not None:
        try:
            _probe(v1, Mechanism.CGROUP_V1)
            _sweep(v1)
            detail = "; ".join([f"memory.limit_in_bytes of a group per instance under {v1}", *reasons])
            return Enforcement(Mechanism.CGROUP_V1, v1, detail)
        except OSError as exc:
            reasons.append(f"cgroup v1: {exc}")
    else:
        reasons.append("cgroup v1: no memory hierarchy mounted")
    return Enforcement(Mechanism.RSS, None, "; ".join(reasons))


class Cgroup:
    """One instance's group: made before spawn, removed after the instance is gone."""

    def __init__(self, parent: Path, name: str, mechanism: Mechanism, limit: int) -> None:
        self.path = parent / name
        self.mechanism = mechanism
        self.limit = limit
        self.path.mkdir()
        try:
            _write(self.path / _limit_file(mechanism), str(limit))
            if mechanism is Mechanism.CGROUP_V2:
                # No swap to escape into, and an OOM kill takes the whole instance, children too.
                with contextlib.suppress(OSError):
                    _write(self.path / "memory.swap.max", "0")
                with contextlib.suppress(OSError):
                    _write(self.path / "memory.oom.group", "1")
            else:
                with contextlib.suppress(OSError):  # absent without swap accounting
                    _write(self.path / "memory.memsw.limit_in_bytes", str(limit))
        except OSError:
            self.path.rmdir()
            raise

    def wrap(self, command: list[str]) -> list[str]:
        """``command``, entering this group before it runs, so nothing escapes the limit."""
        enter = 'echo 0 > "$0" && exec "$@"'
        return ["/bin/sh", "-c", enter, str(self.path / "cgroup.procs"), *command]

    def pids(self) -> list[int]:
        with contextlib.suppress(OSError):
            return [int(p) for p in (self.path / "cgroup.procs").read_text().split()]
        return []

    def oom_kills(self) -> int | None:
        """Processes the kernel killed in this group for its limit (None: this kernel does not say)."""
        name = "memory.events" if self.mechanism is Mechanism.CGROUP_V2 else "memory.oom_control"
        return self._counter(name, "oom_kill")

    def limit_hit(self) -> bool:
        """Whether usage ever reached the limit (older kernels' only sign of an OOM kill)."""
        if self.mechanism is Mechanism.CGROUP_V2:
            return bool(self._counter("memory.events", "max"))
        figures = {}
        for name in ("memory.failcnt", "memory.memsw.failcnt", "memory.max_usage_in_bytes"):
            with contextlib.suppress(OSError, ValueError):
                figures[name] = int((self.path / name).read_text())
        peak = figures.get("memory.max_usage_in_bytes", 0)
        # Some kernels leave failcnt at 0 when memsw is limited too; the peak still shows it.
        return peak >= self.limit - 1024 * 1024 or any(v > 0 for k, v in figures.items() if "failcnt" in k)

    def _counter(self, name: str, key: str) -> int | None:
        with contextlib.suppress(OSError, ValueError):
            for line in (self.path / name).read_text().splitlines():
                field, _, value = line.partition(" ")
                if field == key:
                    return int(value)
        return None

    def remove(self) -> None:
        """Kill whatever is left in the group (a plugin's stray children), then remove it."""
        for attempt in range(40):
            for pid in self.pids():
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(pid, signal.SIGKILL)
            try:
                self.path.rmdir()
                return
            except FileNotFoundError:
                return
            except OSError:
                if attempt == 39:
                    log.warning("could not remove cgroup %s", self.path)
                    return
                time.sleep(0.05)
