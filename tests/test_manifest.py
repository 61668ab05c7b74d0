"""Reading plugin directories in Dify's layout."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from daemon.manifest import ManifestError, discover, load_plugin
from daemon.testing import PLUGINS


def test_the_bundled_plugins_load_with_their_output_schemas() -> None:
    specs, errors = discover(PLUGINS)
    assert errors == {}
    by_id = {spec.id: spec for spec in specs}
    assert set(by_id) == {
        "demo/fastproto",
        "demo/text_toolkit",
        "demo/notes",
        "demo/echo_models",
        "demo/echo_agent",
    }
    assert by_id["demo/echo_models"].providers == {}  # models and strategies are served, not parsed
    fast = by_id["demo/fastproto"].providers["fastproto"]
    assert fast.tools["emit"].output_schema is not None
    assert fast.tools["plain"].output_schema is None
    assert by_id["demo/text_toolkit"].python_version == "3.12"
    assert by_id["demo/text_toolkit"].entrypoint == "main"


def broken_copy(tmp_path: Path, edit: str, replacement: str, file: str = "manifest.yaml") -> Path:
    dest = tmp_path / "fastproto"
    shutil.copytree(PLUGINS / "fastproto", dest, ignore=shutil.ignore_patterns(".venv"))
    path = dest / file
    text = path.read_text()
    assert edit in text
    path.write_text(text.replace(edit, replacement))
    return dest


@pytest.mark.parametrize(
    ("edit", "replacement", "file", "message"),
    [
        ("author: demo", "author: 'a b'", "manifest.yaml", "author must be a simple name"),
        ("language: python", "language: go", "manifest.yaml", "runner language 'go' is not supported"),
        (
            "    - provider/fastproto.yaml",
            "    - provider/missing.yaml",
            "manifest.yaml",
            "missing.yaml is missing",
        ),
        ("  name: emit", "  nam: emit", "tools/emit.yaml", "missing field 'identity.name'"),
        ("type: boolean", "type: bool", "tools/emit.yaml", "invalid output_schema"),
    ],
)
def test_broken_plugins_say_which_file_and_field(
    tmp_path: Path, edit: str, replacement: str, file: str, message: str
) -> None:
    with pytest.raises(ManifestError, match=message):
        load_plugin(broken_copy(tmp_path, edit, replacement, file))


def test_discover_reports_broken_directories_and_keeps_the_rest(tmp_path: Path) -> None:
    broken_copy(tmp_path, "language: python", "language: go")
    shutil.copytree(PLUGINS / "notes", tmp_path / "notes", ignore=shutil.ignore_patterns(".venv"))
    (tmp_path / "not-a-plugin").mkdir()
    specs, errors = discover(tmp_path)
    assert [s.id for s in specs] == ["demo/notes"]
    assert list(errors) == ["fastproto"]


def test_a_missing_plugins_directory_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ManifestError, match="does not exist"):
        discover(tmp_path / "nope")
