"""What Dify reads of a package: its declaration (the manifest with each provider file's
contents inlined, as upstream's ``PluginDeclaration`` is serialised), its unique identifier,
and its READMEs. Every file is read through :mod:`daemon.manifest`'s bounded reader."""

from __future__ import annotations

import datetime
import fnmatch
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from daemon.declarations import category as declared_category
from daemon.manifest import MAX_FILE_BYTES, ManifestError, _load_yaml, _read
from daemon.packages.archive import PackageError

# pkg/entities/plugin_entities/identity.go in langgenius/dify-plugin-daemon: lower case only.
# "\Z", not "$": "$" also matches before a final newline.
IDENTIFIER = re.compile(
    r"^(?:([a-z0-9_-]{1,64})/)?([a-z0-9_-]{1,255}):([0-9]{1,4})(\.[0-9]{1,4}){1,3}(-\w{1,16})?@[a-f0-9]{32,64}\Z"
)
_UUID = re.compile(r"^[0-9a-f]{8}-?[0-9a-f]{4}-?[0-9a-f]{4}-?[0-9a-f]{4}-?[0-9a-f]{12}$")
_README = re.compile(r"^README_([a-z]{2}_[A-Za-z]{2,})\.md$")
# Manifest key under ``plugins``, the declaration's key, and the provider file's list of files.
_KINDS = (
    ("tools", "tool", "tools", "tools"),
    ("endpoints", "endpoint", "endpoints", "endpoints"),
    ("agent_strategies", "agent_strategy", "strategies", "strategies"),
    ("datasources", "datasource", "datasources", "datasources"),
    ("triggers", "trigger", "events", "events"),  # a trigger provider lists its events
)


def _jsonable(node: Any) -> Any:
    """YAML's dates become RFC 3339 strings, as Go's time.Time marshals."""
    if isinstance(node, Mapping):
        return {str(k): _jsonable(v) for k, v in node.items()}
    if isinstance(node, list):
        return [_jsonable(v) for v in node]
    if isinstance(node, datetime.datetime):
        return node.isoformat().replace("+00:00", "Z")
    if isinstance(node, datetime.date):
        return node.isoformat()
    return node


def _yaml(root: Path, relative: Any) -> dict[str, Any]:
    if not isinstance(relative, str):
        raise ManifestError(f"manifest.yaml: a plugin file name must be a string, got {relative!r}")
    return dict(_jsonable(_load_yaml(root / relative, root)))


def _category(plugins: Mapping[str, Any]) -> str:
    return declared_category({"plugins": plugins})  # one definition, shared with the listings


def _model(root: Path, provider_file: Any) -> dict[str, Any]:
    """A model provider with its models: the files its ``models.<type>.predefined`` patterns match."""
    provider = _yaml(root, provider_file)
    by_type = provider.get("models")
    patterns = [
        pattern
        for declared in (by_type.values() if isinstance(by_type, Mapping) else [])
        if isinstance(declared, Mapping)
        for pattern in (declared.get("predefined") or [])
        if isinstance(pattern, str)
    ]
    models = []
    for path in sorted(root.rglob("*.yaml")):
        name = path.relative_to(root).as_posix()
        if name.endswith("_position.yaml") or not any(_glob(name, p) for p in patterns):
            continue
        models.append(_yaml(root, name))
    provider["models"] = models
    return provider


def _glob(name: str, pattern: str) -> bool:
    """Go's ``filepath.Match``: ``*`` and ``?`` never cross a ``/``."""
    parts, wanted = name.split("/"), pattern.split("/")
    return len(parts) == len(wanted) and all(
        fnmatch.fnmatchcase(a, b) for a, b in zip(parts, wanted, strict=True)
    )


def declaration(root: Path) -> dict[str, Any]:
    """The manifest as upstream answers it in ``manifest``: fields as written, ``category``,
    ``verified`` (set by the caller) and each declared provider's file with its files inlined."""
    data = _yaml(root, "manifest.yaml")
    plugins = data.get("plugins") if isinstance(data.get("plugins"), Mapping) else {}
    for key, field, list_key, _ in _KINDS:
        for provider_file in plugins.get(key) or []:
            provider = _yaml(root, provider_file)
            files = provider.get(list_key) or []
            provider[list_key] = [_yaml(root, f) for f in files] if isinstance(files, list) else []
            data[field] = provider
    for provider_file in plugins.get("models") or []:
        data["model"] = _model(root, provider_file)
    data["category"] = _category(plugins)
    return data


def identity(data: Mapping[str, Any], checksum: str) -> str:
    """``author/name:version@checksum``, refused unless it is one upstream accepts."""
    author, name, version = data.get("author"), data.get("name"), data.get("version")
    identifier = f"{author}/{name}:{version}@{checksum}"
    if isinstance(author, str) and _UUID.match(author):
        # Upstream keeps uuid authors for plugins under remote debugging (``RemoteLike``).
        raise PackageError("refused: the author cannot be a UUID")
    if not IDENTIFIER.match(identifier):
        raise PackageError(
            f"refused: {author}/{name}:{version} is not a valid plugin identity "
            "(author and name: lower-case letters, digits, '_' or '-'; version like 1.2.3)"
        )
    return identifier


def readmes(root: Path) -> dict[str, str]:
    """``README.md`` as en_US and ``readme/README_<lang>.md`` by language (upstream's layout)."""
    found: dict[str, str] = {}
    if (root / "README.md").is_file():
        found["en_US"] = _read(root / "README.md", root)
    folder = root / "readme"
    for path in sorted(folder.iterdir()) if folder.is_dir() else []:
        match = _README.match(path.name)
        if match and path.is_file() and path.stat().st_size <= MAX_FILE_BYTES:
            found[match.group(1)] = _read(path, root)
    return found
