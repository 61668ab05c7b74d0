"""Reading a plugin directory in Dify's layout: the manifest, providers and tools.

Only what the daemon acts on is kept: identity, the runner, each tool's parameters
and compiled ``output_schema``. A directory that does not load is reported with a
short message saying which file and field is wrong, and the daemon serves the others.

A plugin directory is untrusted input. Every file read must be a regular file inside
the plugin's directory (no absolute paths, no ``..``, no symlink out, no FIFO or
device), at most :data:`MAX_FILE_BYTES`, UTF-8, and parse to at most
:data:`MAX_NODES` YAML nodes (shared aliases counted at each use: the
"billion laughs") nested at most :data:`MAX_DEPTH` deep. Those bounds also bound the
time parsing takes. Two directories claiming the same ``author/name`` are both
refused: whichever sorted first would otherwise take the other's storage namespace.
"""

from __future__ import annotations

import functools
import os
import re
import stat
from collections import defaultdict
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from daemon.config import ValidatorBackend
from daemon.validation import OutputSchema, SchemaDeclarationError

_NAME = re.compile(r"^[a-z0-9_][a-z0-9_.-]{0,127}$", re.IGNORECASE)
MAX_FILE_BYTES = 1024 * 1024
MAX_NODES = 100_000
MAX_DEPTH = 64
MAX_REASON = 300  # characters of a load error kept for /plugins and the log
_Loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


class ManifestError(ValueError):
    """A plugin directory that does not describe a usable plugin."""


@dataclass(frozen=True)
class ToolSpec:
    name: str
    parameters: tuple[Mapping[str, Any], ...]
    output_schema: OutputSchema | None


@dataclass(frozen=True)
class ProviderSpec:
    name: str
    tools: Mapping[str, ToolSpec]


@dataclass(frozen=True)
class PluginSpec:
    path: Path
    author: str
    name: str
    version: str
    python_version: str
    entrypoint: str
    providers: Mapping[str, ProviderSpec] = field(default_factory=dict)
    memory: int | None = None  # resource.memory as declared, in bytes

    @functools.cached_property
    def id(self) -> str:
        return f"{self.author}/{self.name}"


def _read(path: Path, root: Path) -> str:
    """The text of ``path`` if it is a bounded, regular, UTF-8 file inside ``root``."""
    where = path.relative_to(root) if path.is_relative_to(root) else path
    if not path.resolve().is_relative_to(root):
        raise ManifestError(f"{where}: refused, the path leads outside the plugin directory")
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW)
    except FileNotFoundError:
        raise ManifestError(f"{where} is missing") from None
    except OSError as exc:
        raise ManifestError(f"{where} is not readable: {exc.strerror}") from None
    with os.fdopen(fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise ManifestError(f"{where}: refused, not a regular file")
        data = f.read(MAX_FILE_BYTES + 1)
    if len(data) > MAX_FILE_BYTES:
        raise ManifestError(f"{where}: refused, larger than {MAX_FILE_BYTES} bytes")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ManifestError(f"{where} is not UTF-8 (byte {exc.start})") from None


def _bounded(data: Any, where: Path) -> None:
    """Refuse a document that is huge once its aliases are expanded, or nested too deep."""
    nodes = 0
    stack = [(data, 0)]
    while stack:
        node, depth = stack.pop()
        nodes += 1
        if nodes > MAX_NODES:
            raise ManifestError(f"{where}: refused, over {MAX_NODES} YAML nodes once aliases are expanded")
        if depth > MAX_DEPTH:
            raise ManifestError(f"{where}: refused, nested deeper than {MAX_DEPTH}")
        if isinstance(node, Mapping):
            stack.extend((v, depth + 1) for v in node.values())
        elif isinstance(node, list):
            stack.extend((v, depth + 1) for v in node)


def _load_yaml(path: Path, root: Path) -> Mapping[str, Any]:
    text = _read(path, root)
    where = path.relative_to(root) if path.is_relative_to(root) else path
    try:
        data = yaml.load(text, Loader=_Loader)
    except yaml.MarkedYAMLError as exc:  # the problem and where, never the quoted contents
        mark = exc.problem_mark
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        raise ManifestError(f"{where} is not readable YAML: {exc.problem or exc.context}{at}") from None
    except yaml.YAMLError as exc:
        raise ManifestError(f"{where} is not readable YAML: {type(exc).__name__}") from None
    except RecursionError:
        raise ManifestError(f"{where}: refused, nested too deep") from None
    _bounded(data, where)
    if not isinstance(data, Mapping):
        raise ManifestError(f"{where} must hold a mapping at the top level")
    return data


def _field(data: Mapping[str, Any], dotted: str, where: Path) -> Any:
    node: Any = data
    for part in dotted.split("."):
        if not isinstance(node, Mapping) or part not in node:
            raise ManifestError(f"{where}: missing field {dotted!r}")
        node = node[part]
    return node


def _name(value: Any, what: str, where: Path) -> str:
    if not isinstance(value, str) or not _NAME.match(value):
        raise ManifestError(f"{where}: {what} must be a simple name, got {value!r}")
    return value


def load_tool(
    path: Path, backend: ValidatorBackend = ValidatorBackend.JSONSCHEMA, root: Path | None = None
) -> ToolSpec:
    data = _load_yaml(path, root or path.parent.resolve())
    name = _name(_field(data, "identity.name", path), "identity.name", path)
    parameters = data.get("parameters") or []
    if not isinstance(parameters, list):
        raise ManifestError(f"{path}: 'parameters' must be a list")
    schema = data.get("output_schema")
    compiled = None
    if schema is not None:
        if not isinstance(schema, Mapping):
            raise ManifestError(f"{path}: 'output_schema' must be a mapping")
        try:
            compiled = OutputSchema(schema, backend)
        except SchemaDeclarationError as exc:
            raise ManifestError(f"{path}: {exc}") from None
    return ToolSpec(name, tuple(p for p in parameters if isinstance(p, Mapping)), compiled)


def load_provider(
    root: Path, relative: str, backend: ValidatorBackend = ValidatorBackend.JSONSCHEMA
) -> ProviderSpec:
    path = root / relative
    data = _load_yaml(path, root)
    name = _name(_field(data, "identity.name", path), "identity.name", path)
    tools: dict[str, ToolSpec] = {}
    for tool_file in data.get("tools") or []:
        tool = load_tool(root / str(tool_file), backend, root)
        tools[tool.name] = tool
    return ProviderSpec(name, tools)


def _declares_other_kinds(plugins: Any) -> bool:
    """Models, agent strategies, datasources, triggers, endpoints: served, but not parsed here."""
    kinds = ("models", "agent_strategies", "datasources", "triggers", "endpoints")
    return isinstance(plugins, Mapping) and any(plugins.get(kind) for kind in kinds)


def load_plugin(root: Path, backend: ValidatorBackend = ValidatorBackend.JSONSCHEMA) -> PluginSpec:
    root = root.resolve()
    path = root / "manifest.yaml"
    data = _load_yaml(path, root)
    runner = _field(data, "meta.runner", path)
    if not isinstance(runner, Mapping):
        raise ManifestError(f"{path}: 'meta.runner' must be a mapping")
    language = runner.get("language", "python")
    if language != "python":
        raise ManifestError(f"{path}: runner language {language!r} is not supported (python only)")
    providers: dict[str, ProviderSpec] = {}
    plugins = data.get("plugins")
    provider_files = plugins.get("tools") if isinstance(plugins, Mapping) else None
    for provider_file in provider_files or []:
        provider = load_provider(root, str(provider_file), backend)
        providers[provider.name] = provider
    if not providers and not _declares_other_kinds(plugins):
        raise ManifestError(f"{path}: declares nothing to serve under 'plugins' (tools, models, ...)")
    return PluginSpec(
        path=root,
        author=_name(_field(data, "author", path), "author", path),
        name=_name(_field(data, "name", path), "name", path),
        version=str(data.get("version", "0.0.0")),
        python_version=str(runner.get("version", "3.12")),
        entrypoint=_name(runner.get("entrypoint", "main"), "meta.runner.entrypoint", path),
        providers=providers,
        memory=_declared_memory(data),
    )


def _declared_memory(data: Mapping[str, Any]) -> int | None:
    resource = data.get("resource")
    memory = resource.get("memory") if isinstance(resource, Mapping) else None
    return memory if isinstance(memory, int) and not isinstance(memory, bool) and memory > 0 else None


def discover(
    plugins_dir: Path, backend: ValidatorBackend = ValidatorBackend.JSONSCHEMA
) -> tuple[list[PluginSpec], dict[str, str]]:
    """Every loadable plugin below ``plugins_dir``, and an error per directory that is not.

    Output schemas are compiled for ``backend``, once, here.
    """
    specs: list[PluginSpec] = []
    errors: dict[str, str] = {}
    if not plugins_dir.is_dir():
        raise ManifestError(f"plugins directory {plugins_dir} does not exist")
    for child in sorted(plugins_dir.iterdir()):
        if not child.is_dir() or child.name.startswith(".") or not (child / "manifest.yaml").exists():
            continue
        try:
            specs.append(load_plugin(child, backend))
        except ManifestError as exc:
            errors[child.name] = _short(str(exc))
        except Exception as exc:  # a plugin directory must never stop the daemon from starting
            errors[child.name] = _short(f"could not be loaded: {type(exc).__name__}: {exc}")
    claims: dict[str, list[PluginSpec]] = defaultdict(list)
    for spec in specs:
        claims[spec.id].append(spec)
    for plugin_id, claimants in claims.items():
        if len(claimants) > 1:
            names = ", ".join(spec.path.name for spec in claimants)
            for spec in claimants:
                errors[spec.path.name] = f"plugin id {plugin_id} is claimed by {names}; none is loaded"
    return [spec for spec in specs if len(claims[spec.id]) == 1], errors


def _short(reason: str) -> str:
    return reason if len(reason) <= MAX_REASON else reason[: MAX_REASON - 1] + "…"
