"""Reading plugin directories in Dify's layout."""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from daemon.config import ValidatorBackend
from daemon.manifest import ManifestError, discover, load_plugin
from daemon.testing import PLUGINS, Daemon, copy_plugin
from daemon.validation import OutputSchema, SchemaDeclarationError


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
        "demo/echo_endpoints",
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


SECRET = "top-secret-value"


def _append(path: Path, text: str) -> None:
    path.write_text(path.read_text() + text)


def _replace(path: Path, old: str, new: str) -> None:
    text = path.read_text()
    assert old in text, (path, old)
    path.write_text(text.replace(old, new))


def _laughs(anchor: str, levels: int, fan: int) -> str:
    """YAML whose aliases expand to fan**levels nodes from a few hundred bytes."""
    lines = [f"  {anchor}0: &{anchor}0 [{', '.join(['lol'] * fan)}]"]
    for i in range(1, levels):
        lines.append(f"  {anchor}{i}: &{anchor}{i} [{', '.join([f'*{anchor}{i - 1}'] * fan)}]")
    return "\n".join(lines) + "\n"


def _all_of_bomb(tool: Path) -> None:
    defs = ["  $defs:", "    b0: &b0 {type: boolean}"]
    defs += [f"    b{i}: &b{i} {{allOf: [{', '.join([f'*b{i - 1}'] * 4)}]}}" for i in range(1, 13)]
    _replace(tool, "output_schema:\n", "output_schema:\n" + "\n".join(defs) + "\n")


def _fifo(tool: Path) -> None:
    tool.unlink()
    os.mkfifo(tool)


def _dev_zero(tool: Path) -> None:
    tool.unlink()
    tool.symlink_to("/dev/zero")


# name -> (what the test does to a fresh copy of fastproto, what the refusal must say)
BAD_PACKAGES: dict[str, tuple[Callable[[Path], None], str]] = {
    "bad-utf8": (
        lambda d: (d / "manifest.yaml").write_bytes(
            (d / "manifest.yaml").read_bytes() + b"\nlabel2: \xff\xfe\n"
        ),
        "not UTF-8",
    ),
    "deep": (lambda d: _append(d / "tools" / "emit.yaml", "deep: " + "[" * 5000 + "]" * 5000 + "\n"), "nest"),
    "laughs": (lambda d: _append(d / "manifest.yaml", "lol:\n" + _laughs("l", 9, 10)), "YAML nodes"),
    "all-of-bomb": (lambda d: _all_of_bomb(d / "tools" / "emit.yaml"), "YAML nodes"),
    "fifo": (lambda d: _fifo(d / "tools" / "emit.yaml"), "not a regular file"),
    "dev-zero": (lambda d: _dev_zero(d / "tools" / "emit.yaml"), "outside the plugin directory"),
    "huge": (lambda d: _append(d / "manifest.yaml", "#" * (30 * 1024 * 1024) + "\n"), "larger than"),
    "absolute": (
        lambda d: _replace(
            d / "provider" / "fastproto.yaml", "tools/plain.yaml", str(d.parent.parent / "secret.yaml")
        ),
        "outside the plugin directory",
    ),
    "escape": (
        lambda d: _replace(d / "provider" / "fastproto.yaml", "tools/plain.yaml", "../../secret.yaml"),
        "outside the plugin directory",
    ),
}


def test_every_bad_package_fails_alone_and_the_others_serve(
    start: Callable[..., Daemon], tmp_path: Path
) -> None:
    """Each bad package fails with a short reason; the good plugin serves; nothing leaks."""
    (tmp_path / "secret.yaml").write_text(f"identity:\n  name: {SECRET}\n")
    plugins = tmp_path / "plugins"
    plugins.mkdir()
    copy_plugin("fastproto", plugins, as_name="good")
    for name, (damage, _) in BAD_PACKAGES.items():
        damage(copy_plugin("fastproto", plugins, as_name=name))
    # Two directories claiming one id: neither may take the namespace.
    copy_plugin("fastproto", plugins)
    shutil.copytree(plugins / "fastproto", plugins / "aaa-impostor")

    daemon = start(plugins)
    daemon.wait_ready("demo/good")
    listing = httpx.get(f"{daemon.url}/plugins", headers={"X-Api-Key": daemon.key}, timeout=30).json()
    errors = listing["load_errors"]
    for name, (_, reason) in BAD_PACKAGES.items():
        assert reason in errors[name], (name, errors[name])
    for name in ("fastproto", "aaa-impostor"):
        assert "demo/fastproto is claimed by aaa-impostor, fastproto" in errors[name]
    assert all(len(reason) <= 300 for reason in errors.values())
    assert {p["plugin_id"] for p in listing["plugins"]} == {"demo/good"}
    assert SECRET not in str(listing) and SECRET not in daemon.log()
    events = daemon.invoke("demo/good", "emit", {"count": 2}, provider="fastproto")
    assert all(e.ok for e in events)


def test_a_ref_bomb_in_an_output_schema_is_refused_at_load() -> None:
    """Without YAML aliases, the same exponential walk through ``$ref``."""
    defs: dict[str, Any] = {"d0": {"type": "boolean"}}
    for i in range(1, 41):
        defs[f"d{i}"] = {"anyOf": [{"$ref": f"#/$defs/d{i - 1}"}, {"$ref": f"#/$defs/d{i - 1}"}]}
    declared = {"$defs": defs, "type": "object", "properties": {"x": {"$ref": "#/$defs/d40"}}}
    for backend in ValidatorBackend:
        with pytest.raises(SchemaDeclarationError, match="expands to more than"):
            OutputSchema(declared, backend)
    # A recursive schema (a tree) is fine: recursion is bounded by the instance.
    tree = {
        "$defs": {
            "node": {
                "type": "object",
                "properties": {"kids": {"type": "array", "items": {"$ref": "#/$defs/node"}}},
            }
        },
        "$ref": "#/$defs/node",
    }
    assert OutputSchema(tree).check({"kids": [{"kids": []}]}) is None
