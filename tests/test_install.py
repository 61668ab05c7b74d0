"""Per-plugin virtualenvs, made once with a Python that satisfies the manifest."""

from __future__ import annotations

import asyncio
import re
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from daemon.install import STAMP, InstallError, ensure_venv, find_interpreter, install_method, uv_bin
from daemon.manifest import load_plugin
from daemon.testing import PLUGINS, Daemon, copy_plugin
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


@pytest.mark.parametrize(
    ("files", "method"),
    [
        (("pyproject.toml", "uv.lock", "requirements.txt"), "uv sync --frozen"),
        (("pyproject.toml", "requirements.txt"), "uv sync"),
        (("requirements.txt",), "uv pip install"),
    ],
)
def test_the_install_method_follows_upstreams_order(
    tmp_path: Path, files: tuple[str, ...], method: str
) -> None:
    for name in files:
        (tmp_path / name).write_text("")
    assert install_method(tmp_path).name == method


def test_a_plugin_without_a_dependency_file_cannot_be_installed(tmp_path: Path) -> None:
    with pytest.raises(InstallError, match=r"neither pyproject\.toml nor requirements\.txt found"):
        install_method(tmp_path)


def test_uv_comes_from_the_uv_package() -> None:
    out = subprocess.run([uv_bin(), "--version"], capture_output=True, text=True, check=True)
    assert out.stdout.startswith("uv ")


def test_plugins_packaged_either_way_install_with_uv_and_report_progress(
    start: Callable[..., Daemon], tmp_path: Path
) -> None:
    """A pyproject.toml + uv.lock SDK plugin (today's official layout), a requirements.txt one,
    and one with neither, each installed from nothing by the daemon."""
    plugins = tmp_path / "plugins"
    plugins.mkdir()
    copy_plugin("text_toolkit", plugins)
    copy_plugin("fastproto", plugins)
    bare = copy_plugin("fastproto", plugins, as_name="bare")
    (bare / "requirements.txt").unlink()
    daemon = start(plugins)
    daemon.wait_ready("demo/text_toolkit", "demo/fastproto")
    listed = daemon.plugins()
    assert listed["demo/text_toolkit"]["install"]["method"] == "uv sync --frozen"
    assert listed["demo/text_toolkit"]["install"]["state"] == "done"
    assert isinstance(listed["demo/text_toolkit"]["install"]["seconds"], float)
    assert listed["demo/fastproto"]["install"]["method"] == "uv pip install"
    bare_status = wait_for(lambda: (p := daemon.plugins()["demo/bare"])["status"] == "failed" and p)
    assert "neither pyproject.toml nor requirements.txt found" in bare_status["error"]
    assert bare_status["install"]["state"] == "failed"
    events = daemon.invoke("demo/text_toolkit", "word_stats", {"text": "a b a"})
    assert events[0].message["message"] == {"text": "3 words, 2 unique"}
    r = httpx.post(daemon.invoke_url(), **daemon.invocation("demo/bare", "emit"), timeout=30)
    assert r.status_code == 503 and "neither pyproject.toml" in r.json()["message"]
    log = daemon.log_path.read_text()
    assert "plugin demo/text_toolkit: installing with uv sync --frozen (pyproject.toml, uv.lock)" in log
    assert re.search(r"plugin demo/text_toolkit: installed in [0-9.]+ s", log)
    assert "plugin demo/fastproto: installing with uv pip install (requirements.txt)" in log


def test_a_venv_remade_at_the_same_path_gets_its_packages(tmp_path: Path) -> None:
    """A dependency change remakes .venv in place; the new one must have the packages again."""
    plugin = copy_plugin("text_toolkit", tmp_path)
    spec = load_plugin(plugin)
    for _ in range(2):
        python = asyncio.run(ensure_venv(spec))
        subprocess.run([python, "-c", "import dify_plugin"], check=True)
        with (plugin / "pyproject.toml").open("a") as f:
            f.write("# changed\n")  # the stamp no longer matches: the next call remakes .venv
