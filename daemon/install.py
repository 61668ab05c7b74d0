"""Giving each plugin its own virtualenv, once, with uv, the way upstream does.

``<plugin>/.venv`` is made with ``uv venv`` and a Python that satisfies the manifest's
``meta.runner.version``, then filled from the plugin's dependency file, in upstream's order
(``setup_python_environment.go`` in langgenius/dify-plugin-daemon):

1. ``pyproject.toml``: ``uv sync --no-dev``, with ``--frozen`` when ``uv.lock`` is there;
2. else ``requirements.txt``: ``uv pip install -r`` (nothing to do when it lists nothing);
3. else the plugin fails with a reason saying so.

A stamp file records what was installed, so later starts skip the work unless the
interpreter or a dependency file changed. ``uv`` comes from the ``uv`` package on PyPI, a
dependency of the daemon, found with its ``find_uv_bin``.
"""

from __future__ import annotations

import asyncio
import contextlib
import glob
import hashlib
import logging
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from daemon.manifest import PluginSpec

log = logging.getLogger(__name__)

STAMP = ".daemon-installed"
OUTPUT_TAIL_LINES = 15


class InstallError(RuntimeError):
    """The plugin's environment could not be made; the message says what is missing."""


@dataclass
class InstallProgress:
    """What ``GET /plugins`` shows of a plugin's install while and after it runs."""

    state: str = "pending"  # pending, running, done, skipped (already installed), failed
    method: str | None = None
    step: str | None = None
    started_at: float | None = None  # wall clock, for operators
    seconds: float | None = None
    error: str | None = None
    _started: float = 0.0

    def begin(self, method: str) -> None:
        self.state, self.method, self.started_at, self._started = (
            "running",
            method,
            time.time(),
            time.monotonic(),
        )

    def finish(self, state: str, error: str | None = None) -> None:
        self.state, self.error, self.step = state, error, None
        if self._started:
            self.seconds = round(time.monotonic() - self._started, 3)

    def describe(self) -> dict[str, Any]:
        running_for = round(time.monotonic() - self._started, 1) if self.state == "running" else None
        return {
            "state": self.state,
            "method": self.method,
            "step": self.step,
            "started_at": self.started_at,
            "seconds": self.seconds if running_for is None else running_for,
            "error": self.error,
        }


def _version_of(python: str) -> tuple[int, int] | None:
    try:
        out = subprocess.run(
            [python, "-c", "import sys; print('%d.%d' % sys.version_info[:2])"],
            capture_output=True,
            text=True,
            timeout=30,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode != 0:
        return None
    major, _, minor = out.stdout.strip().partition(".")
    return (int(major), int(minor)) if major.isdigit() and minor.isdigit() else None


def _wanted(version: str) -> tuple[int, int]:
    parts = version.strip().lstrip(">=~^ ").split(".")
    try:
        return int(parts[0]), int(parts[1]) if len(parts) > 1 else 0
    except ValueError:
        raise InstallError(f"meta.runner.version {version!r} is not a Python version") from None


def candidate_interpreters(version: str) -> list[str]:
    """Interpreters worth trying for ``version``, best guesses first."""
    major, minor = _wanted(version)
    found: list[str] = []
    pyenv_root = os.environ.get("PYENV_ROOT") or os.path.expanduser("~/.pyenv")
    # pyenv's shims refuse to run an interpreter that is not selected, so go to the real ones.
    found += sorted(glob.glob(f"{pyenv_root}/versions/{major}.{minor}.*/bin/python{major}.{minor}"))
    for name in (f"python{major}.{minor}", "python3"):
        path = shutil.which(name)
        if path and "/shims/" not in path:
            found.append(path)
    if sys.version_info[:2] >= (major, minor):
        found.append(sys.executable)
    return list(dict.fromkeys(found))


def find_interpreter(version: str, configured: str | None = None) -> str:
    wanted = _wanted(version)
    if configured:
        got = _version_of(configured)
        if got is None:
            raise InstallError(f"PYTHON_INTERPRETER_PATH={configured} does not run")
        if got < wanted:
            raise InstallError(
                f"PYTHON_INTERPRETER_PATH={configured} is Python {got[0]}.{got[1]}, "
                f"the plugin needs >= {wanted[0]}.{wanted[1]}"
            )
        return configured
    tried = []
    for python in candidate_interpreters(version):
        got = _version_of(python)
        tried.append(f"{python} ({f'{got[0]}.{got[1]}' if got else 'does not run'})")
        if got is not None and got >= wanted and got[0] == wanted[0]:
            return python
    raise InstallError(
        f"no Python >= {wanted[0]}.{wanted[1]} found (tried: {', '.join(tried) or 'nothing'}); "
        "install one or set PYTHON_INTERPRETER_PATH"
    )


def uv_bin() -> str:
    """The ``uv`` binary the ``uv`` package installed beside this Python."""
    try:
        from uv import find_uv_bin
    except ImportError:
        raise InstallError("the uv package is not installed beside the daemon (pip install uv)") from None
    try:
        return find_uv_bin()
    except FileNotFoundError as exc:
        raise InstallError(f"uv binary not found: {exc}") from None


@dataclass(frozen=True)
class Method:
    """How a plugin's dependencies are installed, and the files that decide it."""

    name: str  # "uv sync --frozen", "uv sync" or "uv pip install"
    files: tuple[Path, ...]


def install_method(path: Path) -> Method:
    """Upstream's order: ``pyproject.toml`` (frozen by ``uv.lock``), else ``requirements.txt``."""
    pyproject, lock, requirements = path / "pyproject.toml", path / "uv.lock", path / "requirements.txt"
    if pyproject.is_file():
        if lock.is_file():
            return Method("uv sync --frozen", (pyproject, lock))
        return Method("uv sync", (pyproject,))
    if requirements.is_file():
        return Method("uv pip install", (requirements,))
    raise InstallError(
        f"neither pyproject.toml nor requirements.txt found in {path}: "
        "the plugin's dependencies cannot be installed"
    )


def _stamp_text(python: str, method: Method) -> str:
    digest = hashlib.sha256()
    for file in method.files:
        digest.update(file.name.encode() + b"\0" + file.read_bytes() + b"\0")
    return f"{python}\n{method.name}\n{digest.hexdigest()}\n"


def venv_python(spec: PluginSpec) -> Path:
    return spec.path / ".venv" / "bin" / "python"


def is_installed(spec: PluginSpec) -> bool:
    stamp = spec.path / ".venv" / STAMP
    return stamp.exists() and venv_python(spec).exists()


def _uv_environment(venv: Path) -> dict[str, str]:
    """The daemon's environment for uv, minus what would point it at the daemon's own venv."""
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONHOME", "CONDA_PREFIX")}
    env["UV_PROJECT_ENVIRONMENT"] = str(venv)  # uv sync fills the plugin's .venv, nothing else
    env.setdefault("UV_PYTHON_DOWNLOADS", "never")  # use the interpreter we found, never fetch one
    env.setdefault("UV_NO_PROGRESS", "1")
    return env


async def _run(cmd: list[str], what: str, cwd: Path, env: dict[str, str] | None = None) -> None:
    proc = await asyncio.create_subprocess_exec(
        *cmd, cwd=cwd, env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
    )
    try:
        output, _ = await proc.communicate()
    except asyncio.CancelledError:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        raise
    if proc.returncode != 0:
        tail = output.decode(errors="replace").strip().splitlines()[-OUTPUT_TAIL_LINES:]
        raise InstallError(f"{what} failed (exit {proc.returncode}):\n" + "\n".join(tail))


def _has_requirements(path: Path) -> bool:
    lines = (line.split("#", 1)[0].strip() for line in path.read_text().splitlines())
    return any(lines)


async def ensure_venv(
    spec: PluginSpec, configured_python: str | None = None, progress: InstallProgress | None = None
) -> Path:
    """Create and fill ``<plugin>/.venv`` unless the stamp says it is current.

    Logs the start, the end with its duration, or the failure, at INFO (failures at ERROR
    by the caller, which also marks the plugin failed).
    """
    progress = progress or InstallProgress()
    try:
        return await _ensure_venv(spec, configured_python, progress)
    except InstallError as exc:
        progress.finish("failed", str(exc))
        log.info("plugin %s: install failed after %.1f s", spec.id, progress.seconds or 0.0)
        raise


async def _ensure_venv(spec: PluginSpec, configured_python: str | None, progress: InstallProgress) -> Path:
    venv = spec.path / ".venv"
    stamp = venv / STAMP
    method = install_method(spec.path)
    progress.step = "finding a Python"
    python = await asyncio.to_thread(find_interpreter, spec.python_version, configured_python)
    expected = _stamp_text(python, method)
    if stamp.exists() and venv_python(spec).exists() and stamp.read_text() == expected:
        progress.method = method.name
        progress.finish("skipped")
        return venv_python(spec)
    uv = uv_bin()
    progress.begin(method.name)
    log.info(
        "plugin %s: installing with %s (%s)", spec.id, method.name, ", ".join(f.name for f in method.files)
    )
    if venv.exists():
        await asyncio.to_thread(shutil.rmtree, venv)
    env = _uv_environment(venv)
    # --refresh below: with uv's shared cache, a .venv remade at the path of an older one was
    # seen taken for it ("Checked N packages", nothing installed); refreshing costs about a second.
    progress.step = "creating .venv"
    await _run(
        [uv, "venv", str(venv), "--python", python], f"creating the virtualenv of {spec.id}", spec.path, env
    )
    if method.name.startswith("uv sync"):
        progress.step = method.name
        cmd = [uv, "sync", "--refresh", "--no-dev", "--python", str(venv_python(spec))]
        if method.name.endswith("--frozen"):
            cmd.append("--frozen")
        await _run(cmd, f"{method.name} in {spec.path}", spec.path, env)
    elif _has_requirements(method.files[0]):
        progress.step = method.name
        cmd = [
            uv,
            "pip",
            "install",
            "--refresh",
            "--python",
            str(venv_python(spec)),
            "-r",
            str(method.files[0]),
        ]
        await _run(cmd, f"installing {method.files[0]}", spec.path, env)
    stamp.write_text(expected)
    progress.finish("done")
    log.info("plugin %s: installed in %.1f s", spec.id, progress.seconds or 0.0)
    return venv_python(spec)
