"""What a plugin process can reach of the daemon, and the walls between them.

A plugin is third-party code. Whatever the mode, the daemon

* keeps the server key out of every plugin's environment, arguments and stdin;
* scrubs ``SERVER_KEY`` from its own environment once read (``/proc/<pid>/environ``
  shows the variable's name with its value blanked) and makes itself non-dumpable
  (``PR_SET_DUMPABLE`` 0), so a process of the same user cannot read its
  ``environ``, memory or file descriptors through ``/proc`` or attach a debugger;
* does not count a plugin process as a trusted local client of ``/metrics`` and
  ``/debug/*``: a loopback connection whose socket belongs to one of the daemon's
  descendants needs the key like a remote one (:func:`peer_is_plugin`).

With ``PLUGIN_ISOLATION=uid`` (for a daemon started as root) each plugin also runs
under its own unprivileged uid and gid (``PLUGIN_UID_BASE`` plus a number derived from
the plugin id), with no supplementary groups, and the state directory is made 0700:
the key file and the storage database (every tenant's data) are then out of its reach.
Without it a plugin runs as the daemon's user and could open those files directly.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import ipaddress
import logging
import os
import shutil
import struct
import zlib
from pathlib import Path

from starlette.requests import Request

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


def setpriv_args(plugin_id: str, mode: str, base: int) -> list[str]:
    """Extra ``setpriv`` arguments that drop a plugin to its own uid (empty unless ``uid``)."""
    if mode != "uid":
        return []
    uid = plugin_uid(plugin_id, base)
    return [f"--reuid={uid}", f"--regid={uid}", "--clear-groups"]


def prepare_state_dir(state_dir: Path, mode: str) -> None:
    """In ``uid`` mode, the state directory is for the daemon's user alone."""
    if mode == "uid":
        if os.geteuid() != 0 or shutil.which("setpriv") is None:
            raise SystemExit("plugin-daemon: PLUGIN_ISOLATION=uid needs root and setpriv (util-linux)")
        state_dir.mkdir(parents=True, exist_ok=True)
        state_dir.chmod(0o700)
    elif os.geteuid() == 0:
        log.warning(
            "running as root with PLUGIN_ISOLATION=none: plugins run as root and can read "
            "the state directory; set PLUGIN_ISOLATION=uid"
        )


def _proc_address(host: str, port: int) -> tuple[str, str]:
    """(``/proc/net`` file, address column) of a socket bound to ``host:port``."""
    address = ipaddress.ip_address(host)
    words = struct.unpack(f"={len(address.packed) // 4}I", address.packed)
    text = "".join(f"{word:08X}" for word in words)
    return ("tcp6" if address.version == 6 else "tcp"), f"{text}:{port:04X}"


def _socket_inode(host: str, port: int) -> int | None:
    table, wanted = _proc_address(host, port)
    with contextlib.suppress(OSError), open(f"/proc/net/{table}") as f:
        next(f)
        for line in f:
            fields = line.split()
            if fields[1] == wanted:
                return int(fields[9])
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


def peer_is_plugin(request: Request) -> bool:
    """Whether the connection's other end is a socket held by one of our descendants."""
    client = request.client
    if client is None:
        return False
    inode = _socket_inode(client.host, client.port)
    if inode is None:
        return False
    target = f"socket:[{inode}]"
    for pid in _descendants(os.getpid()):
        with contextlib.suppress(OSError):
            for fd in os.listdir(f"/proc/{pid}/fd"):
                with contextlib.suppress(OSError):
                    if os.readlink(f"/proc/{pid}/fd/{fd}") == target:
                        return True
    return False
