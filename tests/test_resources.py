"""Memory limit resolution, cgroup discovery and placement, and /proc figures of real processes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from pydantic import ValidationError

from daemon.config import Settings
from daemon.manifest import load_plugin
from daemon.resources import cgroups, limits, procfs
from daemon.resources.cgroups import Mechanism
from daemon.resources.monitor import InstanceResources
from daemon.testing import copy_plugin
from tests.test_runtime import wait_for

MIB = 2**20


def test_the_manifest_counts_from_256_mib_and_an_override_wins() -> None:
    default, overrides = 1024 * MIB, limits.parse_overrides("demo/big=2GiB, demo/free=0")
    assert limits.resolve("demo/a", 1 * MIB, default, overrides) == limits.MemoryLimit(
        1024 * MIB, "default", 1 * MIB
    )
    assert limits.resolve("demo/a", 256 * MIB, default, overrides).source == "manifest"
    assert limits.resolve("demo/a", 256 * MIB, default, overrides).bytes == 256 * MIB
    assert limits.resolve("demo/a", None, default, overrides).bytes == 1024 * MIB
    assert limits.resolve("demo/big", 256 * MIB, default, overrides).bytes == 2048 * MIB
    assert limits.resolve("demo/free", 512 * MIB, default, overrides) == limits.MemoryLimit(
        None, "none", 512 * MIB
    )
    assert limits.resolve("demo/a", None, 0, {}) == limits.MemoryLimit(None, "none", None)


@pytest.mark.parametrize("bad", ["demo/a", "demo/a=lots", "noslash=1GiB"])
def test_a_malformed_override_is_refused_at_start_up(bad: str) -> None:
    with pytest.raises(ValidationError, match="plugin_memory_limits"):
        Settings(plugin_memory_limits=bad)


def test_settings_take_sizes_with_units() -> None:
    settings = Settings(plugin_memory_limit="512MiB", plugin_memory_limits="demo/a=1GiB")
    assert settings.plugin_memory_limit == 512 * MIB
    assert settings.memory_limit_overrides == {"demo/a": 1024 * MIB}


HYBRID = """\
31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
32 31 0:29 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu
35 31 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
"""
CONTAINER_V2 = "1021 1011 0:26 /kubepods/pod1 /sys/fs/cgroup ro,nosuid - cgroup2 cgroup rw\n"


def test_the_daemons_own_groups_are_found_in_both_hierarchies() -> None:
    membership = "4:memory:/process_api/abc\n1:cpu:/\n0::/user.slice/x\n"
    assert cgroups.locate(HYBRID, membership) == {
        Mechanism.CGROUP_V1: cgroups.Path("/sys/fs/cgroup/memory/process_api/abc"),
        Mechanism.CGROUP_V2: cgroups.Path("/sys/fs/cgroup/unified/user.slice/x"),
    }
    # A container sees its own group as the mount's root.
    assert cgroups.locate(CONTAINER_V2, "0::/kubepods/pod1/app\n") == {
        Mechanism.CGROUP_V2: cgroups.Path("/sys/fs/cgroup/app")
    }
    assert cgroups.locate(CONTAINER_V2, "0::/elsewhere\n") == {}


def test_usage_of_a_real_process_tree() -> None:
    script = (
        "import subprocess, sys, threading, time\n"
        "keep = [b'x' * (40 * 2**20)]\n"
        "threading.Thread(target=time.sleep, args=(60,), daemon=True).start()\n"
        "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])\n"
        "print('ready', flush=True)\n"
        "end = time.process_time() + 0.3\n"
        "while time.process_time() < end: pass\n"
        "time.sleep(60)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE)
    tree: list[int] = [proc.pid]
    try:
        assert proc.stdout is not None and proc.stdout.readline() == b"ready\n"
        tree = wait_for(lambda: len(procfs.descendants(proc.pid)) == 2 and procfs.descendants(proc.pid))
        assert tree[0] == proc.pid
        usage = wait_for(lambda: (u := procfs.usage(tree)) and u.cpu_seconds >= 0.3 and u)
        assert usage.processes == 2
        assert usage.memory_bytes > 40 * MIB
        assert usage.threads >= 3  # main + sleeper, and the child
        assert usage.open_fds >= 6  # stdin/out/err of each
    finally:
        for pid in reversed(tree):
            os.kill(pid, signal.SIGKILL)
        proc.wait()
    assert procfs.usage([proc.pid]) is None


@pytest.fixture
def enforcement() -> cgroups.Enforcement:
    found = cgroups.detect()
    if found.parent is None:  # CI machines have a writable memory controller; say so if not
        pytest.skip(f"no usable cgroup memory controller here: {found.detail}")
    return found


def test_a_process_started_in_its_group_is_oom_killed_there_and_the_group_removed(
    enforcement: cgroups.Enforcement,
) -> None:
    assert enforcement.parent is not None
    group = cgroups.Cgroup(
        enforcement.parent, f"{cgroups.PREFIX}0-test-{time.time_ns()}", enforcement.mechanism, 64 * MIB
    )
    try:
        hog = "keep = [b'x' * 2**20 for _ in range(200)]"
        result = subprocess.run(group.wrap([sys.executable, "-c", hog]), capture_output=True)
        assert result.returncode == -9, result
        assert group.oom_kills() == 1 and group.limit_hit()
        # A well-behaved process in the same group runs to the end.
        assert (
            subprocess.run(group.wrap([sys.executable, "-c", "print(1)"]), capture_output=True).stdout
            == b"1\n"
        )
    finally:
        group.remove()
    assert not group.path.exists()


def test_rss_can_be_chosen_over_cgroups() -> None:
    assert cgroups.detect("rss").mechanism is Mechanism.RSS


def _usage(cpu: float, rss: int = 20 * MIB) -> procfs.Usage:
    return procfs.Usage(cpu_seconds=cpu, memory_bytes=rss, open_fds=3, threads=2, processes=1)


def _watched(**settings: object) -> tuple[InstanceResources, Settings]:
    config = Settings(**{"plugin_idle_cpu_share": 0.5, "plugin_idle_cpu_seconds": 2, **settings})
    return InstanceResources("demo/watched", 0, None, config), config


def test_idle_cpu_is_judged_over_the_whole_window_and_never_with_sessions() -> None:
    res, settings = _watched()
    # Busy (90% of a core) with a session open the whole time: never a kill.
    assert all(res.observe(t, _usage(0.9 * t), 1, settings) is None for t in range(10))
    # Idle from t=10: the window fills at t=12 and the share over it is above 50%.
    assert res.observe(10, _usage(9.0), 0, settings) is None
    assert res.observe(11, _usage(9.9), 0, settings) is None
    reason = res.observe(12, _usage(10.8), 0, settings)
    assert reason is not None and "90% of a core for 2.0 s with no open session" in reason


def test_a_session_between_two_samples_resets_the_idle_window() -> None:
    res, settings = _watched()
    res.observe(0, _usage(0), 0, settings)
    res.observe(1, _usage(0.9), 0, settings)
    res.sessions_started += 1  # opened and closed between samples: the CPU may be its work
    assert res.observe(2, _usage(1.8), 0, settings) is None
    assert res.observe(3, _usage(2.7), 0, settings) is None
    assert res.observe(4, _usage(3.6), 0, settings) is not None  # two idle seconds since t=2


def test_below_the_share_or_with_the_watchdog_off_nothing_is_killed() -> None:
    res, settings = _watched()
    assert all(res.observe(t, _usage(0.4 * t), 0, settings) is None for t in range(20))
    res, settings = _watched(plugin_idle_cpu_share=0)
    assert all(res.observe(t, _usage(1.0 * t), 0, settings) is None for t in range(20))


def test_the_rss_watchdog_holds_the_limit_where_no_cgroup_could_be_made() -> None:
    res, settings = _watched(plugin_memory_limits="demo/watched=64MiB")
    res.enforcement = cgroups.Enforcement(Mechanism.CGROUP_V1, cgroups.Path("/nonexistent/cgroup"), "")
    res.mechanism = Mechanism.CGROUP_V1.value
    assert res.wrap(["python", "-m", "main"]) == ["python", "-m", "main"]
    assert res.mechanism == "rss-watchdog" and res.cgroup is None
    assert res.observe(0, _usage(0, rss=60 * MIB), 1, settings) is None
    reason = res.observe(1, _usage(0, rss=70 * MIB), 1, settings)
    assert reason is not None and "exceeded its memory limit of 64 MiB" in reason
    assert "resident 70 MiB" in reason


def test_a_child_killed_at_the_limit_takes_its_whole_instance(enforcement: cgroups.Enforcement) -> None:
    settings = Settings(plugin_memory_limits="demo/forks=64MiB")
    res = InstanceResources("demo/forks", 0, None, settings)
    script = (
        "import subprocess, sys, time\n"
        "hog = 'keep = [b\"x\" * 2**20 for _ in range(200)]'\n"
        "print(subprocess.run([sys.executable, '-c', hog]).returncode, flush=True)\n"
        "time.sleep(60)\n"
    )
    proc = subprocess.Popen(res.wrap([sys.executable, "-c", script]), stdout=subprocess.PIPE)
    try:
        assert proc.stdout is not None and proc.stdout.readline() == b"-9\n"  # the child, not the parent
        usage = procfs.usage([proc.pid])
        assert usage is not None
        reason = res.observe(time.monotonic(), usage, 0, settings)
        assert reason is not None and "exceeding its memory limit of 64 MiB" in reason
    finally:
        proc.kill()
        proc.wait()
        res.release()
    assert res.cgroup is not None and not res.cgroup.path.exists()


@pytest.mark.parametrize(
    ("declared", "expected"), [("268435456", 256 * MIB), ("1048576", MIB), ('"lots"', None), ("true", None)]
)
def test_the_manifest_memory_is_read_as_declared(tmp_path: Path, declared: str, expected: int | None) -> None:
    plugin = copy_plugin("fastproto", tmp_path)
    manifest = plugin / "manifest.yaml"
    manifest.write_text(manifest.read_text().replace("memory: 268435456", f"memory: {declared}"))
    assert load_plugin(plugin).memory == expected
