"""Giving each plugin its own virtualenv, once.

``<plugin>/.venv`` is created with a Python that satisfies the manifest's
``meta.runner.version`` and gets the plugin's ``requirements.txt``. A stamp file
records what was installed, so later starts skip the work unless the
requirements or the interpreter changed.
"""

from __future__ import annotations

import asyncio
import glob
import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

from daemon.manifest import PluginSpec

STAMP = ".daemon-installed"


class InstallError(RuntimeError):
    """The plugin's environment could not be made; the message says what is missing."""


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


def _stamp_text(spec: PluginSpec, python: str) -> str:
    req = spec.path / "requirements.txt"
    digest = hashlib.sha256(req.read_bytes() if req.exists() else b"").hexdigest()
    return f"{python}\n{digest}\n"


def venv_python(spec: PluginSpec) -> Path:
    return spec.path / ".venv" / "bin" / "python"


def is_installed(spec: PluginSpec) -> bool:
    stamp = spec.path / ".venv" / STAMP
    return stamp.exists() and venv_python(spec).exists()


async def _run(cmd: list[str], what: str, cwd: Path) -> None:
    proc = await asyncio.create_subprocess_exec(
        *cmd, cwd=cwd, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
    )
    output, _ = await proc.communicate()
    if proc.returncode != 0:
        tail = output.decode(errors="replace").strip().splitlines()[-15:]
        raise InstallError(f"{what} failed (exit {proc.returncode}):\n" + "\n".join(tail))


def _has_requirements(path: Path) -> bool:
    if not path.exists():
        return False
    lines = (line.split("#", 1)[0].strip() for line in path.read_text().splitlines())
    return any(lines)


async def ensure_venv(spec: PluginSpec, configured_python: str | None = None) -> Path:
    """Create and fill ``<plugin>/.venv`` unless the stamp says it is current."""
    venv = spec.path / ".venv"
    stamp = venv / STAMP
    python = await asyncio.to_thread(find_interpreter, spec.python_version, configured_python)
    expected = _stamp_text(spec, python)
    if stamp.exists() and venv_python(spec).exists() and stamp.read_text() == expected:
        return venv_python(spec)
    if venv.exists():
        await asyncio.to_thread(shutil.rmtree, venv)
    requirements = spec.path / "requirements.txt"
    with_pip = _has_requirements(requirements)
    cmd = [python, "-m", "venv", str(venv)]
    if not with_pip:
        cmd.append("--without-pip")
    await _run(cmd, f"creating the virtualenv of {spec.id} with {python}", spec.path)
    if with_pip:
        pip = [str(venv_python(spec)), "-m", "pip", "install", "--disable-pip-version-check", "-q"]
        await _run([*pip, "-r", str(requirements)], f"installing {requirements}", spec.path)
    stamp.write_text(expected)
    return venv_python(spec)
