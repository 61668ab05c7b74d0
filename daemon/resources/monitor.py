"""Per-instance resources: the limit, its cgroup, the figures sampled, the idle-CPU watchdog.

The runtime holds one :class:`InstanceResources` per instance and calls it at four
points: ``wrap`` the launch command (enter the cgroup), ``sessions_started`` when a
session opens, ``exit_cause`` when the process is gone (was it the kernel's OOM
killer?), and ``release`` after (remove the cgroup). :class:`ResourceMonitor` samples
every live instance from ``/proc`` on a timer and kills through the instance's own
``kill(reason)``, so a kill looks like any other death: its sessions end with
``PluginInstanceDiedError`` naming the reason, and the pool restarts it with backoff.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import itertools
import logging
import os
import re
import signal
import time
from collections import deque
from collections.abc import Callable, Iterable, Sized
from typing import Any, Protocol

from prometheus_client import Counter
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from daemon import metrics
from daemon.config import Settings
from daemon.resources import cgroups, limits, procfs
from daemon.resources.cgroups import Cgroup, Enforcement, Mechanism

log = logging.getLogger(__name__)

KILL_REASONS = ("memory_limit", "idle_cpu")
kills_total = Counter(
    "plugin_instance_kills",
    "Instances killed for their resources: over the memory limit, or busy while idle.",
    ["plugin_id", "reason"],
    registry=metrics.REGISTRY,
)
_serial = itertools.count()
_announced: set[str] = set()


@functools.cache
def enforcement(preference: str) -> Enforcement:
    """Decided once per daemon (and logged): which mechanism holds the memory limits."""
    chosen = cgroups.detect(preference)
    log.info("memory limits: %s (%s)", chosen.mechanism.value, chosen.detail)
    return chosen


def limit_for(plugin_id: str, declared: int | None, settings: Settings) -> limits.MemoryLimit:
    return limits.resolve(plugin_id, declared, settings.plugin_memory_limit, settings.memory_limit_overrides)


class InstanceResources:
    """One instance's limit, cgroup and latest figures."""

    def __init__(self, plugin_id: str, index: int, declared: int | None, settings: Settings) -> None:
        self.plugin_id, self.index = plugin_id, index
        self.limit = limit_for(plugin_id, declared, settings)
        self.enforcement = enforcement(settings.plugin_memory_mechanism)
        self.cgroup: Cgroup | None = None
        self.mechanism = self.enforcement.mechanism.value if self.limit.bytes else "none"
        self.sessions_started = 0  # bumped by the runtime; lets the watchdog see short sessions
        self.usage: procfs.Usage | None = None
        self.cpu_share: float | None = None  # of one core, over the last sample interval
        self.killed_for: str | None = None
        self._idle: deque[tuple[float, float]] = deque()  # (time, cpu seconds) since idle
        self._last: tuple[float, int, int] | None = None  # (time, open sessions, sessions started)
        for reason in KILL_REASONS:
            kills_total.labels(plugin_id, reason)
        if plugin_id not in _announced:
            _announced.add(plugin_id)
            size = limits.mib(self.limit.bytes) if self.limit.bytes else "none"
            log.info(
                "plugin %s: memory limit %s (%s), enforced by %s",
                plugin_id,
                size,
                self.limit.source,
                self.mechanism,
            )

    # -- hooks for the runtime ------------------------------------------------------

    def wrap(self, command: list[str]) -> list[str]:
        """The launch command, made to start inside the instance's own cgroup if it has one."""
        parent = self.enforcement.parent
        if self.limit.bytes is None or parent is None:
            return command
        name = f"{cgroups.PREFIX}{os.getpid()}-{re.sub(r'[^A-Za-z0-9_.-]', '_', self.plugin_id)}"
        try:
            self.cgroup = Cgroup(
                parent, f"{name}-{self.index}-{next(_serial)}", self.enforcement.mechanism, self.limit.bytes
            )
        except OSError as exc:
            # The hierarchy changed under us: this instance is still held to its limit, by sampling.
            self.mechanism = Mechanism.RSS.value
            log.error("plugin %s#%d: no cgroup (%s); the RSS watchdog holds its limit", *self._key(), exc)
            return command
        return self.cgroup.wrap(command)

    def _key(self) -> tuple[str, int]:
        return self.plugin_id, self.index

    def exit_cause(self, exit_code: int) -> str | None:
        """Why the process died, if the kernel killed it for its memory limit."""
        if self.cgroup is None or self.limit.bytes is None:
            return None
        kills = self.cgroup.oom_kills()
        # A kernel that does not count OOM kills: a SIGKILL after hitting the limit is one.
        oom = kills > 0 if kills is not None else exit_code == -signal.SIGKILL and self.cgroup.limit_hit()
        return self._killed("memory_limit", self._oom_message()) if oom else None

    def release(self) -> None:
        """After the process is gone: remove its cgroup (killing any stray child first)."""
        if self.cgroup is not None:
            self.cgroup.remove()

    # -- what the monitor decides ---------------------------------------------------------

    def _killed(self, reason: str, message: str) -> str:
        if self.killed_for is None:
            self.killed_for = reason
            kills_total.labels(self.plugin_id, reason).inc()
        return message

    def _oom_message(self) -> str:
        assert self.limit.bytes is not None
        return (
            f"was killed by the kernel for exceeding its memory limit of {limits.mib(self.limit.bytes)}"
            f" ({self.limit.source}; {self.mechanism})"
        )

    def observe(self, now: float, usage: procfs.Usage, open_sessions: int, settings: Settings) -> str | None:
        """Take one sample; return the reason to kill the instance, if there is one."""
        previous = self.usage
        last = self._last
        self.usage = usage
        self._last = (now, open_sessions, self.sessions_started)
        if previous is not None and last is not None and now > last[0]:
            self.cpu_share = max(0.0, usage.cpu_seconds - previous.cpu_seconds) / (now - last[0])
        if self.limit.bytes is not None:
            if self.cgroup is not None and (self.cgroup.oom_kills() or 0) > 0:
                # The kernel killed one of its processes (perhaps a child): take the whole instance.
                return self._killed("memory_limit", self._oom_message())
            if self.mechanism == Mechanism.RSS.value and usage.memory_bytes > self.limit.bytes:
                return self._killed(
                    "memory_limit",
                    f"exceeded its memory limit of {limits.mib(self.limit.bytes)} ({self.limit.source};"
                    f" resident {limits.mib(usage.memory_bytes)} at a sample of the {self.mechanism})",
                )
        return self._watch_idle_cpu(now, usage, open_sessions, last, settings)

    def _watch_idle_cpu(
        self,
        now: float,
        usage: procfs.Usage,
        open_sessions: int,
        last: tuple[float, int, int] | None,
        settings: Settings,
    ) -> str | None:
        share_limit, window = settings.plugin_idle_cpu_share, settings.plugin_idle_cpu_seconds
        idle_since_last = (
            last is not None and last[1] == 0 and open_sessions == 0 and last[2] == self.sessions_started
        )
        if share_limit <= 0 or not idle_since_last:
            self._idle = deque([(now, usage.cpu_seconds)])  # an idle stretch may start here
            return None
        self._idle.append((now, usage.cpu_seconds))
        while len(self._idle) > 2 and now - self._idle[1][0] >= window:
            self._idle.popleft()  # keep the oldest sample at least a window back
        since, cpu_then = self._idle[0]
        span = now - since
        if span < window:
            return None
        share = (usage.cpu_seconds - cpu_then) / span
        if share <= share_limit:
            return None
        return self._killed(
            "idle_cpu",
            f"used {share:.0%} of a core for {span:.1f} s with no open session"
            f" (idle-CPU limit {share_limit:.0%} over {window:g} s)",
        )

    def describe(self) -> dict[str, Any]:
        figures: dict[str, Any] = self.usage.describe() if self.usage is not None else {}
        if self.cpu_share is not None:
            figures["cpu_share"] = round(self.cpu_share, 3)
        return {"resources": figures, "memory_limit_bytes": self.limit.bytes, "cgroup": _path(self.cgroup)}


def _path(group: Cgroup | None) -> str | None:
    return str(group.path) if group is not None else None


class Watched(Protocol):
    """What the monitor needs of a runtime instance."""

    pid: int | None
    resources: InstanceResources

    @property
    def sessions(self) -> Sized: ...

    @property
    def ready(self) -> bool: ...

    def kill(self, reason: str) -> None: ...


class ResourceMonitor:
    """Samples every live instance every ``PLUGIN_RESOURCE_SAMPLE_INTERVAL`` seconds; owns the kills."""

    def __init__(self, settings: Settings, instances: Callable[[], Iterable[Watched]]) -> None:
        self._settings = settings
        self._instances = instances
        self._task: asyncio.Task[None] | None = None
        self.enforcement = enforcement(settings.plugin_memory_mechanism)
        self.collector = ResourceCollector(instances)

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="resource monitor")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _run(self) -> None:
        while True:
            try:
                self.sample()
            except Exception:  # a bad read must not end the watchdog for good
                log.exception("resource sampling failed")
            await asyncio.sleep(self._settings.plugin_resource_sample_interval)

    def sample(self) -> None:
        now = time.monotonic()
        for instance in list(self._instances()):
            res = instance.resources
            if instance.pid is None or not instance.ready:
                continue
            members = res.cgroup.pids() if res.cgroup is not None else []
            usage = procfs.usage(members or procfs.descendants(instance.pid))
            if usage is None:
                continue
            reason = res.observe(now, usage, len(instance.sessions), self._settings)
            if reason is not None:
                instance.kill(reason)


class ResourceCollector(Collector):
    """The latest sample of each instance, at scrape time (no /proc read per scrape)."""

    def __init__(self, instances: Callable[[], Iterable[Watched]]) -> None:
        self._instances = instances

    def collect(self) -> Iterable[Any]:
        labels = ["plugin_id", "instance"]
        cpu = CounterMetricFamily(
            "plugin_instance_cpu_seconds",
            "CPU time (user + system) of the instance's processes, since it started.",
            labels=labels,
        )
        memory = GaugeMetricFamily(
            "plugin_instance_memory_bytes",
            "Resident memory (RSS) of the instance's processes.",
            labels=labels,
        )
        fds = GaugeMetricFamily("plugin_instance_open_fds", "Open file descriptors.", labels=labels)
        threads = GaugeMetricFamily("plugin_instance_threads", "Threads of its processes.", labels=labels)
        limit = GaugeMetricFamily(
            "plugin_instance_memory_limit_bytes", "The memory limit in force (absent: none).", labels=labels
        )
        for instance in list(self._instances()):
            res = instance.resources
            key = [res.plugin_id, str(res.index)]
            if res.limit.bytes is not None:
                limit.add_metric(key, float(res.limit.bytes))
            if res.usage is None:
                continue
            cpu.add_metric(key, res.usage.cpu_seconds)
            memory.add_metric(key, float(res.usage.memory_bytes))
            fds.add_metric(key, float(res.usage.open_fds))
            threads.add_metric(key, float(res.usage.threads))
        yield from (cpu, memory, fds, threads, limit)
