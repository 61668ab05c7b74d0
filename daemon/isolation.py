"""What a plugin process can reach of the daemon, and the walls between them.

A plugin is third-party code. Whatever the mode, the daemon

* keeps the server key out of every plugin's environment, arguments and stdin;
* scrubs ``SERVER_KEY`` from its own environment once read (``/proc/<pid>/environ``
  shows the variable's name with its value blanked) and makes itself non-dumpable
  (``PR_SET_DUMPABLE`` 0), so a process of the same user cannot read its
  ``environ``, memory or file descriptors through ``/proc`` or attach a debugger;
* does not count a plugin process as a trusted local client of ``/metrics`` and
  ``/debug/*``: a loopback connection whose socket belongs to one of the daemon's
  descendants, to a process in one of its plugin instances' cgroups (which a process a
  plugin started and orphaned cannot leave) or to a plugin's uid needs the key like a
  remote one (:func:`peer_is_plugin`).

A daemon started as root (``PLUGIN_ISOLATION=auto``, the default, or ``uid``) makes the
state directory 0700 and runs each plugin under its own unprivileged uid and gid
(``PLUGIN_UID_BASE`` plus a number derived from the plugin id, no supplementary groups)
whenever that uid can run it: :func:`decide` checks the paths it cannot change (the
directories above the plugin, the venv's base interpreter), gives the plugin's group
read access to whatever of the plugin's own tree (its venv included) it could not read,
then runs a probe as that uid. ``auto`` falls back to the daemon's uid with one warning
naming why; ``uid`` fails the plugin with that reason instead.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import ipaddress
import logging
import os
import shutil
import stat
import struct
import subprocess
import zlib
from dataclasses import dataclass
from pathlib import Path

from starlette.requests import Request

from daemon.resources import cgroups

log = logging.getLogger(__name__)

PR_SET_DUMPABLE = 4
UID_SPAN = 50_000


def harden_daemon(secret_names: tuple[str, ...] = ("SERVER_KEY",)) -> None:
    """Blank secrets in this process's environment block and make the process non-dumpable."""
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    environ = ctypes.POINTER(ctypes.c_char_p).in_dll(libc, "environ")
    i = 0
    while environ[i] is not None:
        entry: bytes = environ[i]
        name = entry.split(b"=", 1)[0].decode(errors="replace")
        if name in secret_names:
            address = ctypes.cast(environ, ctypes.POINTER(ctypes.c_void_p))[i]
            if address:  # the value's bytes, in place: /proc/<pid>/environ reads this memory
                ctypes.memset(address + len(name) + 1, 0, len(entry) - len(name) - 1)
        i += 1
    for name in secret_names:
        os.environ.pop(name, None)
    if libc.prctl(PR_SET_DUMPABLE, 0, 0, 0, 0) != 0:
        log.warning("could not make the daemon non-dumpable (errno %d)", ctypes.get_errno())


def plugin_uid(plugin_id: str, base: int) -> int:
    """A stable unprivileged uid (and gid) for one plugin."""
    return base + zlib.crc32(plugin_id.encode()) % UID_SPAN


@dataclass(frozen=True)
class Isolation:
    """The isolation in force for one plugin, and why (shown in ``GET /plugins``)."""

    mode: str  # "uid": its own uid; "none": the daemon's uid
    uid: int | None = None
    reason: str | None = None  # why not "uid", when it is not

    def setpriv_args(self) -> list[str]:
        """Extra ``setpriv`` arguments that drop the plugin to its own uid (empty unless ``uid``)."""
        if self.mode != "uid" or self.uid is None:
            return []
        return [f"--reuid={self.uid}", f"--regid={self.uid}", "--clear-groups"]

    def describe(self) -> dict[str, object]:
        return {"mode": self.mode, "uid": self.uid, "reason": self.reason}


class IsolationError(RuntimeError):
    """``PLUGIN_ISOLATION=uid`` and the plugin's uid cannot run it; the message says why."""


# Run as the plugin's uid, in its directory: what the plugin itself will need to read.
_PROBE = """
import importlib.util, os, sys
entry, plugin_dir = sys.argv[1], sys.argv[2]
os.stat(plugin_dir)
for path in filter(None, sys.path):
    try:
        os.stat(path)
    except FileNotFoundError:
        continue
    except OSError as exc:
        sys.exit(f"{path}: {exc.strerror}")
    if os.path.isdir(path) and not os.access(path, os.R_OK | os.X_OK):
        sys.exit(f"{path} is not readable")
import json  # from the standard library's files, not frozen into the interpreter
sys.path.insert(0, plugin_dir)  # as `python -m` does, after the imports above (-I keeps it out)
found = importlib.util.find_spec(entry)
if found is None or (found.origin and not os.access(found.origin, os.R_OK)):
    sys.exit(f"its entrypoint {entry!r} cannot be imported")
"""


def _can_search(st: os.stat_result, uid: int, need: int) -> bool:
    """Whether ``uid`` (whose only group is ``uid``) has ``need`` (an ``rwx`` mask, 0-7) on it."""
    if st.st_uid == uid:
        return (st.st_mode >> 6) & need == need
    if st.st_gid == uid:
        return (st.st_mode >> 3) & need == need
    return st.st_mode & need == need


def _unreachable(path: Path, uid: int, stop_at: Path | None = None) -> str | None:
    """The first directory above ``path`` (up to ``stop_at``) that ``uid`` cannot search, if any."""
    for parent in reversed(path.parents):
        if stop_at is not None and parent.is_relative_to(stop_at):
            break
        try:
            st = parent.stat()
        except OSError as exc:
            return f"{parent}: {exc.strerror}"
        if not _can_search(st, uid, 1):
            return f"{parent} is not searchable by uid {uid}"
    return None


def _grant_tree(root: Path, uid: int) -> int:
    """Give the plugin's group read (and search) access to each entry of ``root`` it lacks.

    Entries it can already read are left alone; returns how many were changed.
    """
    changed = 0
    for directory, dirs, files in os.walk(root):
        for name in [".", *dirs, *files]:
            path = os.path.join(directory, name)
            st = os.lstat(path)
            if stat.S_ISLNK(st.st_mode):
                continue
            is_dir = stat.S_ISDIR(st.st_mode)
            need = 5 if is_dir or st.st_mode & 0o100 else 4
            if _can_search(st, uid, need):
                continue
            os.chown(path, -1, uid, follow_symlinks=False)
            os.chmod(path, stat.S_IMODE(st.st_mode) | (need << 3))
            changed += 1
    return changed


def _check_uid(plugin_dir: Path, entrypoint: str, python: Path, uid: int) -> None:
    """Raise :class:`IsolationError` unless ``uid`` can run the plugin (granting what is ours)."""
    interpreter = python.resolve()
    for path, what in ((plugin_dir, "the plugin directory"), (interpreter, f"the interpreter {interpreter}")):
        blocked = _unreachable(path, uid)
        if blocked is not None:
            raise IsolationError(f"{what} is out of its reach: {blocked}")
    st = interpreter.stat()
    if not _can_search(st, uid, 5):
        raise IsolationError(f"the interpreter {interpreter} is not readable and executable by uid {uid}")
    _grant_tree(plugin_dir, uid)
    cmd = [
        _setpriv_path(),
        f"--reuid={uid}",
        f"--regid={uid}",
        "--clear-groups",
        "--",
        str(python),
        "-I",
        "-c",
        _PROBE,
        entrypoint,
        str(plugin_dir),
    ]
    env = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"}
    try:
        out = subprocess.run(cmd, cwd=plugin_dir, env=env, capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise IsolationError(f"the probe as uid {uid} did not run: {exc}") from None
    if out.returncode != 0:
        lines = (out.stderr or out.stdout).strip().splitlines()
        raise IsolationError(f"uid {uid} cannot run it: {lines[-1] if lines else f'exit {out.returncode}'}")


def _setpriv_path() -> str:
    found = shutil.which("setpriv")
    if found is None:
        raise IsolationError("setpriv (util-linux) is not installed")
    return found


def decide(
    plugin_id: str, plugin_dir: Path, entrypoint: str, python: Path, mode: str, base: int
) -> Isolation:
    """The isolation ``plugin_id`` runs with; raises :class:`IsolationError` only for ``uid``."""
    if mode == "none":
        return Isolation("none", reason="PLUGIN_ISOLATION=none")
    if os.geteuid() != 0:
        if mode == "uid":
            raise IsolationError("PLUGIN_ISOLATION=uid needs a daemon started as root")
        return Isolation("none", reason="the daemon does not run as root")
    uid = plugin_uid(plugin_id, base)
    try:
        _setpriv_path()
        _check_uid(plugin_dir.resolve(), entrypoint, python.absolute(), uid)
    except (IsolationError, OSError) as exc:
        reason = str(exc) if isinstance(exc, IsolationError) else f"{exc.filename}: {exc.strerror}"
        if mode == "uid":
            raise IsolationError(f"plugin {plugin_id} cannot run under its own uid {uid}: {reason}") from None
        log.warning(
            "plugin %s runs as the daemon's user (root), not under its own uid %d: %s; "
            "make it reachable (e.g. PYTHON_INTERPRETER_PATH=/usr/bin/python3) or set "
            "PLUGIN_ISOLATION=none to run every plugin as root knowingly",
            plugin_id,
            uid,
            reason,
        )
        return Isolation("none", reason=reason)
    log.info("plugin %s runs under its own uid %d", plugin_id, uid)
    return Isolation("uid", uid=uid)


def prepare_state_dir(state_dir: Path, mode: str) -> None:
    """As root (unless ``none``), the state directory is for the daemon's user alone."""
    if mode == "uid" and os.geteuid() != 0:
        raise SystemExit("plugin-daemon: PLUGIN_ISOLATION=uid needs root")
    if mode == "none":
        if os.geteuid() == 0:
            log.warning(
                "running as root with PLUGIN_ISOLATION=none: plugins run as root and can read "
                "the state directory; unset it to run each plugin under its own uid"
            )
        return
    if os.geteuid() == 0:
        state_dir.mkdir(parents=True, exist_ok=True)
        state_dir.chmod(0o700)


def _proc_address(host: str, port: int) -> tuple[str, str]:
    """(``/proc/net`` file, address column) of a socket bound to ``host:port``."""
    address = ipaddress.ip_address(host)
    words = struct.unpack(f"={len(address.packed) // 4}I", address.packed)
    text = "".join(f"{word:08X}" for word in words)
    return ("tcp6" if address.version == 6 else "tcp"), f"{text}:{port:04X}"


def _socket_owner(host: str, port: int) -> tuple[int, int] | None:
    """(inode, uid) of the socket bound to ``host:port``."""
    table, wanted = _proc_address(host, port)
    with contextlib.suppress(OSError), open(f"/proc/net/{table}") as f:
        next(f)
        for line in f:
            fields = line.split()
            if fields[1] == wanted:
                return int(fields[9]), int(fields[7])
    return None


def _descendants(pid: int) -> list[int]:
    found: list[int] = []
    stack = [pid]
    while stack:
        parent = stack.pop()
        with contextlib.suppress(OSError):
            for task in os.listdir(f"/proc/{parent}/task"):
                with open(f"/proc/{parent}/task/{task}/children") as f:
                    children = [int(c) for c in f.read().split()]
                found += children
                stack += children
    return found


@dataclass(frozen=True)
class PluginMarks:
    """What marks a process as a plugin's besides descent: a double fork leaves the daemon's
    tree, but not the uid nor the cgroup the plugin runs in."""

    uids: range  # the uids plugins run under (PLUGIN_UID_BASE on)
    cgroup_parent: Path | None  # where instance cgroups are made, when the kernel enforces limits


def _group_members(parent: Path) -> list[int]:
    found: list[int] = []
    for procs in parent.glob(f"{cgroups.PREFIX}{os.getpid()}-*/cgroup.procs"):
        with contextlib.suppress(OSError, ValueError):
            found += [int(pid) for pid in procs.read_text().split()]
    return found


def peer_is_plugin(request: Request, marks: PluginMarks | None = None) -> bool:
    """Whether the connection's other end is a socket of a plugin's uid, or held by one of our
    descendants or by a process in one of our plugin instances' cgroups."""
    client = request.client
    if client is None:
        return False
    owner = _socket_owner(client.host, client.port)
    if owner is None:
        return False
    inode, uid = owner
    if marks is not None and uid in marks.uids:
        return True
    target = f"socket:[{inode}]"
    pids = set(_descendants(os.getpid()))
    if marks is not None and marks.cgroup_parent is not None:
        pids.update(_group_members(marks.cgroup_parent))
    for pid in pids:
        with contextlib.suppress(OSError):
            for fd in os.listdir(f"/proc/{pid}/fd"):
                with contextlib.suppress(OSError):
                    if os.readlink(f"/proc/{pid}/fd/{fd}") == target:
                        return True
    return False
