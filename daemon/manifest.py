"""Reading a plugin directory in Dify's layout: the manifest, providers and tools.

Only what the daemon acts on is kept: identity, the runner, each tool's parameters
and compiled ``output_schema``. A directory that does not load is reported with a
message saying which file and field is wrong, and the daemon serves the others.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from daemon.config import ValidatorBackend
from daemon.validation import OutputSchema, SchemaDeclarationError

_NAME = re.compile(r"^[a-z0-9_][a-z0-9_.-]{0,127}$", re.IGNORECASE)


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

    @property
    def id(self) -> str:
        return f"{self.author}/{self.name}"


def _load_yaml(path: Path) -> Mapping[str, Any]:
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ManifestError(f"{path} is missing") from None
    except (OSError, yaml.YAMLError) as exc:
        raise ManifestError(f"{path} is not readable YAML: {exc}") from None
    if not isinstance(data, Mapping):
        raise ManifestError(f"{path} must hold a mapping at the top level")
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


def load_tool(path: Path, backend: ValidatorBackend = ValidatorBackend.JSONSCHEMA) -> ToolSpec:
    data = _load_yaml(path)
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
    data = _load_yaml(path)
    name = _name(_field(data, "identity.name", path), "identity.name", path)
    tools: dict[str, ToolSpec] = {}
    for tool_file in data.get("tools") or []:
        tool = load_tool(root / str(tool_file), backend)
        tools[tool.name] = tool
    return ProviderSpec(name, tools)


def load_plugin(root: Path, backend: ValidatorBackend = ValidatorBackend.JSONSCHEMA) -> PluginSpec:
    root = root.resolve()
    path = root / "manifest.yaml"
    data = _load_yaml(path)
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
    if not providers:
        raise ManifestError(f"{path}: declares no tool providers under 'plugins.tools'")
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
            errors[child.name] = str(exc)
    return specs, errors
