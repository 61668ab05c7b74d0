"""One load run per validator design: start a daemon, run locust headless at it, check it survived.

The daemon is a real subprocess on loopback serving fastproto, a second fastproto
copy that the ``Crasher`` users crash on purpose (``demo/crashproto``), and the
bundled SDK plugins. While locust runs, a monitor thread samples the daemon's
memory, descriptors and health and notes every plugin process it spawns. After the
run the daemon must still be the same process, healthy, with every session ended,
every plugin ready, only the crashed plugin restarted, and no plugin process left
behind that it does not own.
"""

from __future__ import annotations

import contextlib
import csv
import os
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import psutil

from daemon.testing import PLUGINS, REPO, Daemon, copy_plugin, start_daemon

LOCUSTFILE = Path(__file__).with_name("locustfile.py")
DESIGNS = ("owner", "lock", "unsafe")
CRASHPROTO = "demo/crashproto"
PLUGIN_IDS = ("demo/fastproto", CRASHPROTO, "demo/text_toolkit", "demo/notes")
# Every scenario of the locustfile; each must have run at least once.
SCENARIOS = (
    "fastproto emit",
    "sdk word_stats",
    "sdk story",
    "sdk notes save",
    "sdk notes read",
    "slow reader",
    "slow reader violation",
    "disconnect",
    "fastproto violation",
    "sdk broken_schema",
    "fastproto raises",
    "sdk flaky",
    "crashproto crash",
)
# The designs kept to reproduce upstream's race: their wrong verdicts are the finding, not a defect.
WRONG_VERDICTS_EXPECTED = frozenset({"lock", "unsafe"})


@dataclass(frozen=True)
class Load:
    users: int
    spawn_rate: float
    run_time: int  # seconds


@dataclass
class Sample:
    t: float
    rss: int
    fds: int
    threads: int
    healthy: bool


@dataclass
class DesignRun:
    design: str
    csv_prefix: Path
    problems: list[str] = field(default_factory=list)
    samples: list[Sample] = field(default_factory=list)
    plugins: dict[str, Any] = field(default_factory=dict)
    log_counts: dict[str, int] = field(default_factory=dict)
    daemon_pid: int = 0


class Monitor(threading.Thread):
    """Samples the daemon every ``interval`` and remembers each child process by (pid, start time)."""

    def __init__(self, daemon: Daemon, interval: float = 0.5) -> None:
        super().__init__(name="daemon monitor", daemon=True)
        self.target = daemon
        self.interval = interval
        self.samples: list[Sample] = []
        self.children: dict[int, float] = {}
        self._halt = threading.Event()
        self._t0 = time.monotonic()

    def run(self) -> None:
        while not self._halt.wait(self.interval):
            self.sample()

    def sample(self) -> None:
        try:
            proc = psutil.Process(self.target.proc.pid)
            with proc.oneshot():
                rss, fds, threads = proc.memory_info().rss, proc.num_fds(), proc.num_threads()
            for child in proc.children(recursive=True):
                with contextlib.suppress(psutil.Error):
                    self.children.setdefault(child.pid, child.create_time())
        except psutil.Error:
            return
        try:
            healthy = httpx.get(f"{self.target.url}/health/check", timeout=10).json()["status"] == "ok"
        except (httpx.HTTPError, ValueError, KeyError):
            healthy = False
        self.samples.append(Sample(time.monotonic() - self._t0, rss, fds, threads, healthy))

    def stop(self) -> None:
        self._halt.set()
        self.join()
        self.sample()


def make_plugins(workdir: Path) -> Path:
    """fastproto, a copy of it to crash, and the SDK plugins (linked: their venvs are shared)."""
    plugins = workdir / "plugins"
    plugins.mkdir(parents=True)
    copy_plugin("fastproto", plugins)
    copy_plugin("fastproto", plugins, as_name="crashproto")
    for name in ("text_toolkit", "notes"):
        (plugins / name).symlink_to(PLUGINS / name, target_is_directory=True)
    return plugins


def listening_pid(port: int) -> int | None:
    for conn in psutil.net_connections("tcp"):
        if conn.status == psutil.CONN_LISTEN and conn.laddr and conn.laddr.port == port:
            return conn.pid
    return None


def run_locust(daemon: Daemon, load: Load, csv_prefix: Path, log_path: Path) -> int:
    env = {**os.environ, "LOADTEST_SERVER_KEY": daemon.key, "PYTHONPATH": str(REPO)}
    cmd = [
        sys.executable,
        "-m",
        "locust",
        "-f",
        str(LOCUSTFILE),
        "--headless",
        "--host",
        daemon.url,
        "--users",
        str(load.users),
        "--spawn-rate",
        str(load.spawn_rate),
        "--run-time",
        f"{load.run_time}s",
        "--stop-timeout",
        "30",
        "--csv",
        str(csv_prefix),
        "--csv-full-history",
        "--only-summary",
        "--exit-code-on-error",
        "0",
        "--loglevel",
        "WARNING",
    ]
    with log_path.open("wb") as log:
        # Bounded: the run time, the graceful stop, and a margin for a machine under load.
        return subprocess.run(
            cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, timeout=load.run_time + 120
        ).returncode


def wait_until(predicate: Any, limit: float) -> bool:
    end = time.monotonic() + limit
    while time.monotonic() < end:
        with contextlib.suppress(httpx.HTTPError):
            if predicate():
                return True
        time.sleep(0.1)
    return False


def survival_problems(daemon: Daemon, pid: int, port: int, monitor: Monitor) -> list[str]:
    """What is wrong with the daemon after the load; empty when it came through whole."""
    if daemon.proc.poll() is not None:
        return [f"the daemon exited with code {daemon.proc.returncode}"]
    problems = []
    if listening_pid(port) != pid:
        problems.append(f"port {port} is no longer served by the daemon's process {pid}")
    if not all(s.healthy for s in monitor.samples):
        bad = sum(not s.healthy for s in monitor.samples)
        problems.append(f"/health/check failed {bad} of {len(monitor.samples)} times during the run")

    def sessions() -> int:
        return sum(i["sessions"] for p in daemon.plugins().values() for i in p["instances"])

    if not wait_until(lambda: sessions() == 0, 60):
        problems.append(f"{sessions()} sessions still open a minute after the load stopped")

    def all_ready() -> bool:
        return all(p["status"] == "ready" and p["instances"] for p in daemon.plugins().values())

    if not wait_until(all_ready, 60):
        problems.append(f"plugins not all ready after the load: {daemon.plugins()}")
    plugins = daemon.plugins()
    for plugin_id, plugin in plugins.items():
        if plugin_id != CRASHPROTO and plugin["restarts"]:
            problems.append(f"{plugin_id} restarted {plugin['restarts']} times; only {CRASHPROTO} crashes")
    monitor.sample()
    current = {i["pid"] for p in plugins.values() for i in p["instances"]}
    strays = [p for p, created in monitor.children.items() if p not in current and _alive(p, created)]
    if strays:
        problems.append(f"plugin processes left behind: {strays}")
    return problems


def _alive(pid: int, created: float) -> bool:
    """The same process (not a reused pid) still exists and is not a zombie."""
    try:
        proc = psutil.Process(pid)
        return proc.create_time() == created and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def run_design(design: str, load: Load, plugins: Path, out: Path, *, env: dict[str, Any]) -> DesignRun:
    """Start a daemon with ``design``, load it, check it; the daemon is always stopped."""
    run = DesignRun(design, out / design)
    log_path = out / f"{design}-daemon.log"
    daemon = start_daemon(plugins, out / f"{design}-state", log_path, validator=design, **env)
    try:
        daemon.wait_ready(*PLUGIN_IDS)
        port = int(daemon.url.rsplit(":", 1)[1])
        run.daemon_pid = pid = daemon.proc.pid
        if listening_pid(port) != pid:
            run.problems.append(f"port {port} is not served by the daemon's process {pid}")
        monitor = Monitor(daemon)
        monitor.start()
        try:
            code = run_locust(daemon, load, run.csv_prefix, out / f"{design}-locust.log")
        finally:
            monitor.stop()
        if code != 0:
            run.problems.append(f"locust exited with code {code} (see {design}-locust.log)")
        run.problems += survival_problems(daemon, pid, port, monitor)
        run.samples = monitor.samples
        if daemon.proc.poll() is None:
            run.plugins = daemon.plugins()
    finally:
        try:
            daemon.stop()
        except AssertionError as exc:  # ignored SIGTERM or orphaned plugin processes
            run.problems.append(str(exc).splitlines()[0])
    log = daemon.log_path.read_text(errors="replace")
    run.log_counts = {
        "tracebacks": log.count("Traceback"),
        "validation crashes logged": log.count("output validation crashed"),
        "plugin restarts logged": log.count(": restarting slot "),
    }
    if run.log_counts["tracebacks"]:
        run.problems.append(f"{run.log_counts['tracebacks']} tracebacks in the daemon log")
    return run


def read_csv(path: Path) -> list[dict[str, str]]:
    if not path.exists():
        return []
    with path.open(newline="") as f:
        return list(csv.DictReader(f))
