"""Per-plugin virtualenvs, made once with a Python that satisfies the manifest."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from daemon.install import STAMP, InstallError, ensure_venv, find_interpreter
from daemon.manifest import load_plugin
from daemon.testing import PLUGINS, Daemon
from tests.test_runtime import wait_for


def test_find_interpreter_finds_a_python_of_the_wanted_version() -> None:
    python = find_interpreter("3.11")
    out = subprocess.run(
        [python, "-c", "import sys; print(sys.version_info >= (3, 11))"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert out.stdout.strip() == "True"


def test_an_impossible_version_names_what_is_missing() -> None:
    with pytest.raises(InstallError, match=r"no Python >= 3\.99 found \(tried: .*\); install one or set"):
        find_interpreter("3.99")


def test_a_configured_interpreter_that_is_too_old_is_refused() -> None:
    with pytest.raises(InstallError, match=r"the plugin needs >= 3\.99"):
        find_interpreter("3.99", sys.executable)


def test_venv_is_made_once_and_remade_when_requirements_change(tmp_path: Path) -> None:
    plugin = tmp_path / "fastproto"
    shutil.copytree(PLUGINS / "fastproto", plugin, ignore=shutil.ignore_patterns(".venv"))
    spec = load_plugin(plugin)
    python = asyncio.run(ensure_venv(spec))
    stamp = plugin / ".venv" / STAMP
    made = stamp.stat().st_mtime_ns
    assert asyncio.run(ensure_venv(spec)) == python
    assert stamp.stat().st_mtime_ns == made  # nothing redone
    (plugin / "requirements.txt").write_text("# changed\n")
    asyncio.run(ensure_venv(spec))
    assert stamp.stat().st_mtime_ns != made


def test_a_requirement_that_cannot_be_installed_is_a_clear_error(tmp_path: Path) -> None:
    plugin = tmp_path / "fastproto"
    shutil.copytree(PLUGINS / "fastproto", plugin, ignore=shutil.ignore_patterns(".venv"))
    (plugin / "requirements.txt").write_text("this-package-does-not-exist-anywhere==0.0.1\n")
    with pytest.raises(InstallError, match=r"installing .*requirements.txt failed") as info:
        asyncio.run(ensure_venv(load_plugin(plugin)))
    assert "this-package-does-not-exist-anywhere" in str(info.value)


def test_a_plugin_that_cannot_install_is_listed_as_failed_and_refused(
    start: Callable[..., Daemon], fastproto: Callable[..., Path]
) -> None:
    plugins = fastproto()
    manifest = plugins / "fastproto" / "manifest.yaml"
    manifest.write_text(manifest.read_text().replace('version: "3.11"', 'version: "3.99"'))
    daemon = start(plugins)
    plugin = wait_for(lambda: (p := daemon.plugins()["demo/fastproto"])["status"] == "failed" and p)
    assert "no Python >= 3.99 found" in plugin["error"]
    r = httpx.post(
        daemon.invoke_url(),
        **daemon.invocation("demo/fastproto", "emit"),
        timeout=30,
    )
    assert r.status_code == 503
    assert "no Python >= 3.99 found" in r.json()["message"]
