"""A plugin's declaration as upstream's daemon sends it to Dify: the manifest with its tool,
model, agent-strategy, datasource or trigger provider filled in from the files the manifest names.

Dify's API server parses these with strict pydantic models (``api/core/plugin/entities/`` in
langgenius/dify), so every field is shaped the way the Go daemon marshals its declaration
structs (``pkg/entities/plugin_entities/*_declaration.go`` in langgenius/dify-plugin-daemon):
the same field set, its defaults (``fetch_from``, ``show_on``, empty lists), its fill-ins
(a tool or trigger provider without a description or tags takes the plugin's; a parameter rule without
a label is labelled by its name), and icons replaced by the asset ids ``asset/{id}`` serves.
Fields upstream does not know (``extra``, file lists) are dropped. A local plugin's files are
read with the manifest loader's bounds; a remote-debug plugin's declarations are what its SDK
sent while registering.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import yaml

from daemon.manifest import ManifestError, _load_yaml, _read

Json = dict[str, Any]
Icon = Callable[[str], str]  # a file name of ``_assets`` -> its asset id

MODEL_TYPES = ("llm", "text_embedding", "tts", "speech2text", "moderation", "rerank")
# The value type of upstream's parameter-rule templates (``use_template``), by template name.
TEMPLATE_TYPES = {
    "temperature": "float",
    "top_p": "float",
    "top_k": "int",
    "presence_penalty": "float",
    "frequency_penalty": "float",
    "max_tokens": "int",
    "response_format": "string",
    "json_schema": "text",
}


def asset_id(name: str, data: bytes) -> str:
    """Upstream's id of an asset: sha256 of its bytes then its name, hex, plus its extension."""
    return hashlib.sha256(data + name.encode()).hexdigest() + Path(name).suffix


def _plain(value: Any) -> Any:
    """YAML values as JSON: dates become RFC 3339 strings as Go's ``time.Time`` marshals them."""
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if isinstance(value, dt.datetime):
        if value.tzinfo is None:
            value = value.replace(tzinfo=dt.UTC)
        return value.isoformat().replace("+00:00", "Z")
    if isinstance(value, dt.date):
        return f"{value.isoformat()}T00:00:00Z"
    return value


def _map(value: Any) -> Mapping[str, Any]:
    return value if isinstance(value, Mapping) else {}


def _list(value: Any) -> list[Any]:
    return list(value) if isinstance(value, list | tuple) else []


def i18n(value: Any, fallback: str = "") -> Json:
    """Upstream's ``I18nObject``: ``en_US`` always, the other languages when set."""
    if isinstance(value, str):
        return {"en_US": value}
    value = _map(value)
    out: Json = {"en_US": str(value.get("en_US") or fallback)}
    for lang in ("ja_JP", "zh_Hans", "pt_BR"):
        if value.get(lang):
            out[lang] = str(value[lang])
    return out


def _opt_i18n(value: Any) -> Json | None:
    return i18n(value) if value else None


def _options(value: Any) -> list[Any]:
    out = []
    for option in _list(value):
        option = _map(option)
        entry: Json = {"value": option.get("value"), "label": i18n(option.get("label"))}
        if option.get("icon"):
            entry["icon"] = option["icon"]
        out.append(entry)
    return out


def _parameter(p: Mapping[str, Any], *, tool: bool, described: bool = False) -> Json:
    """A tool's, a strategy's or (``described``) a datasource's parameter."""
    out: Json = {
        "name": p.get("name"),
        "label": i18n(p.get("label")),
    }
    if tool:
        out["human_description"] = i18n(p.get("human_description"))
    elif not described:
        out["help"] = i18n(p.get("help"))
    out["type"] = p.get("type")
    out["scope"] = p.get("scope")
    if tool:
        out["form"] = p.get("form")
        out["llm_description"] = str(p.get("llm_description") or "")
    out.update(
        required=bool(p.get("required")),
        auto_generate=p.get("auto_generate"),
        template=p.get("template"),
        default=p.get("default"),
        min=p.get("min"),
        max=p.get("max"),
        precision=p.get("precision"),
        options=_options(p.get("options")),
    )
    if tool:
        out["multiple"] = bool(p.get("multiple"))
    if described:
        out["description"] = i18n(p.get("description"))
    return out


def _event_parameter(p: Mapping[str, Any]) -> Json:
    """A trigger event's or subscription constructor's parameter (``EventParameter``): upstream
    leaves out every optional field that is unset."""
    out: Json = {"name": p.get("name"), "label": i18n(p.get("label")), "type": p.get("type")}
    for key in ("auto_generate", "template", "scope"):
        if p.get(key) is not None:
            out[key] = p[key]
    out["required"] = bool(p.get("required"))
    if p.get("multiple"):
        out["multiple"] = True
    for key in ("default", "min", "max", "precision"):
        if p.get(key) is not None:
            out[key] = p[key]
    if _list(p.get("options")):
        out["options"] = [{"label": o["label"], "value": o["value"]} for o in _options(p.get("options"))]
    if p.get("description"):
        out["description"] = i18n(p.get("description"))
    return out


def _credentials(provider: Mapping[str, Any]) -> list[Any]:
    """``credentials_schema`` (or ``credentials_for_provider``) as a list; a mapping is keyed by name."""
    schema = provider.get("credentials_schema") or provider.get("credentials_for_provider")
    if isinstance(schema, Mapping):
        return [{**_map(v), "name": k} for k, v in schema.items()]
    return _list(schema)


class Reader:
    """Reads the files a local plugin's manifest names, within the manifest loader's bounds."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def yaml(self, relative: Any) -> Mapping[str, Any]:
        return _load_yaml(self.root / str(relative), self.root)

    def glob(self, pattern: str) -> list[Mapping[str, Any]]:
        try:
            found = sorted(p for p in self.root.glob(pattern) if p.is_file())
        except (NotImplementedError, ValueError, OSError) as exc:  # an absolute or malformed pattern
            raise ManifestError(f"model files {pattern!r}: {exc}") from None
        return [_load_yaml(p, self.root) for p in found if not p.name.endswith("_position.yaml")]

    def strings(self, relative: str) -> list[str]:
        """A position file: a YAML list of model names."""
        data = yaml.safe_load(_read(self.root / relative, self.root))
        return [str(x) for x in data] if isinstance(data, list) else []


def _inline(items: Any, reader: Reader | None) -> list[Mapping[str, Any]]:
    """File names read through ``reader``; mappings (declared inline, or sent by the SDK) as they are."""
    out = []
    for item in _list(items):
        if isinstance(item, Mapping):
            out.append(item)
        elif reader is not None and isinstance(item, str):
            out.append(reader.yaml(item))
    return out


def _provider_identity(provider: Mapping[str, Any], icon: Icon) -> Json:
    """A tool or agent-strategy provider's identity (``ToolProviderIdentity`` upstream)."""
    identity = _map(provider.get("identity"))
    return {
        "author": identity.get("author"),
        "name": identity.get("name"),
        "description": i18n(identity.get("description")),
        "icon": icon(str(identity.get("icon") or "")),
        "icon_dark": icon(str(identity.get("icon_dark") or "")),
        "label": i18n(identity.get("label")),
        "tags": _list(identity.get("tags")),
    }


def _item_identity(item: Mapping[str, Any]) -> Json:
    """A tool's or a strategy's identity (``ToolIdentity`` upstream)."""
    identity = _map(item.get("identity"))
    return {
        "author": identity.get("author"),
        "name": identity.get("name"),
        "label": i18n(identity.get("label")),
    }


def _with_output_schema(entry: Json, item: Mapping[str, Any]) -> Json:
    """``entry`` with the item's ``output_schema`` when it declares one (upstream's ``omitempty``)."""
    if item.get("output_schema"):
        entry["output_schema"] = item["output_schema"]
    return entry


def tool_provider(provider: Mapping[str, Any], reader: Reader | None, icon: Icon) -> Json:
    tools = []
    for tool in _inline(provider.get("tools"), reader):
        description = _map(tool.get("description"))
        entry: Json = {
            "identity": _item_identity(tool),
            "description": {
                "human": i18n(description.get("human")),
                "llm": str(description.get("llm") or ""),
            },
            "parameters": [_parameter(_map(p), tool=True) for p in _list(tool.get("parameters"))],
            "has_runtime_parameters": bool(tool.get("has_runtime_parameters")),
        }
        tools.append(_with_output_schema(entry, tool))
    return {
        "identity": _provider_identity(provider, icon),
        "credentials_schema": _credentials(provider),
        "oauth_schema": provider.get("oauth_schema"),
        "tools": tools,
    }


def _form_schemas(schema: Any) -> Json | None:
    if not isinstance(schema, Mapping):
        return None
    forms = []
    for form in _list(schema.get("credential_form_schemas")):
        form = _map(form)
        default = form.get("default")
        forms.append(
            {
                "variable": form.get("variable"),
                "label": i18n(form.get("label")),
                "type": form.get("type"),
                "required": bool(form.get("required")),
                "default": None if default is None else str(default),
                "options": [
                    {
                        "label": i18n(_map(o).get("label")),
                        "value": _map(o).get("value"),
                        "show_on": _list(_map(o).get("show_on")),
                    }
                    for o in _list(form.get("options"))
                ],
                "help": _opt_i18n(form.get("help")),
                "url": form.get("url"),
                "placeholder": _opt_i18n(form.get("placeholder")),
                "max_length": int(form.get("max_length") or 0),
                "show_on": _list(form.get("show_on")),
            }
        )
    out: Json = {"credential_form_schemas": forms}
    if "model" in schema:
        model = _map(schema.get("model"))
        out = {
            "model": {"label": i18n(model.get("label")), "placeholder": _opt_i18n(model.get("placeholder"))},
            **out,
        }
    return out


def _parameter_rule(rule: Mapping[str, Any]) -> Json:
    template = rule.get("use_template")
    label = rule.get("label")
    return {
        "name": rule.get("name"),
        "use_template": template,
        "label": i18n(label) if label and i18n(label)["en_US"] else {"en_US": str(rule.get("name"))},
        "type": rule.get("type") or TEMPLATE_TYPES.get(str(template)),
        "help": _opt_i18n(rule.get("help")),
        "required": bool(rule.get("required")),
        "default": rule.get("default"),
        "min": rule.get("min"),
        "max": rule.get("max"),
        "precision": rule.get("precision"),
        "options": [str(o) for o in _list(rule.get("options"))],
    }


def _model(model: Mapping[str, Any]) -> Json:
    return {
        "model": model.get("model"),
        "label": i18n(model.get("label")),
        "model_type": model.get("model_type"),
        "features": model.get("features") if isinstance(model.get("features"), list) else None,
        "fetch_from": model.get("fetch_from") or "predefined-model",
        "model_properties": model.get("model_properties")
        if isinstance(model.get("model_properties"), Mapping)
        else None,
        "deprecated": bool(model.get("deprecated")),
        "parameter_rules": [_parameter_rule(_map(r)) for r in _list(model.get("parameter_rules"))],
        "pricing": model.get("pricing"),
    }


def model_provider(provider: Mapping[str, Any], reader: Reader | None, icon: Icon) -> Json:
    models: list[Any] = []
    position: Json = {}
    declared = provider.get("models")
    if isinstance(declared, Mapping) and reader is not None:  # {llm: {predefined: [globs], position: file}}
        patterns: list[str] = []
        for model_type in MODEL_TYPES:
            entry = _map(declared.get(model_type))
            patterns += [str(p) for p in _list(entry.get("predefined"))]
            if entry.get("position"):
                position[model_type] = reader.strings(str(entry["position"]))
        seen: set[int] = set()
        for pattern in patterns:
            for model in reader.glob(pattern):
                if id(model) not in seen:
                    seen.add(id(model))
                    models.append(_model(model))
    else:  # sent inline (a remote plugin's SDK sends the models it loaded)
        models = [_model(_map(m)) for m in _list(declared or provider.get("model_declarations"))]

    def icons(value: Any) -> Json | None:
        value = _opt_i18n(value)
        return None if value is None else {lang: icon(name) for lang, name in value.items()}

    out: Json = {
        "provider": provider.get("provider"),
        "label": i18n(provider.get("label")),
        "description": _opt_i18n(provider.get("description")),
        "icon_small": icons(provider.get("icon_small")),
        "icon_large": icons(provider.get("icon_large")),
        "icon_small_dark": icons(provider.get("icon_small_dark")),
        "icon_large_dark": icons(provider.get("icon_large_dark")),
        "background": provider.get("background"),
        "help": provider.get("help"),
        "supported_model_types": _list(provider.get("supported_model_types")),
        "configurate_methods": _list(provider.get("configurate_methods")),
        "provider_credential_schema": _form_schemas(provider.get("provider_credential_schema")),
        "model_credential_schema": _form_schemas(provider.get("model_credential_schema")),
        "models": models,
    }
    if position:
        out["position"] = position
    return out


def agent_provider(provider: Mapping[str, Any], reader: Reader | None, icon: Icon) -> Json:
    strategies = []
    for strategy in _inline(provider.get("strategies"), reader):
        strategies.append(
            {
                "identity": _item_identity(strategy),
                "description": i18n(strategy.get("description")),
                "parameters": [_parameter(_map(p), tool=False) for p in _list(strategy.get("parameters"))],
                "output_schema": strategy.get("output_schema"),
                "features": strategy.get("features") if isinstance(strategy.get("features"), list) else None,
            }
        )
    return {
        "identity": _provider_identity(provider, icon),
        "strategies": strategies,
    }


def _provider_config(c: Mapping[str, Any]) -> Json:
    """A setting of an endpoint group (upstream's ``ProviderConfig``)."""
    return {
        "name": c.get("name"),
        "type": c.get("type"),
        "scope": c.get("scope"),
        "required": bool(c.get("required")),
        "default": c.get("default"),
        "options": _options(c.get("options")),
        "multiple": bool(c.get("multiple")),
        "label": i18n(c.get("label"), str(c.get("name") or "")),
        "help": _opt_i18n(c.get("help")),
        "url": c.get("url"),
        "placeholder": _opt_i18n(c.get("placeholder")),
    }


def endpoint_provider(group: Mapping[str, Any], reader: Reader | None) -> Json:
    """An endpoint group (``EndpointProviderDeclaration``): its settings and its endpoints, each
    ``{path, method, hidden}`` (read from the file it names, or as declared inline)."""
    return {
        "settings": [_provider_config(_map(c)) for c in _list(group.get("settings"))],
        "endpoints": [
            {
                "path": str(e.get("path") or ""),
                "method": str(e.get("method") or ""),
                "hidden": bool(e.get("hidden")),
            }
            for e in _inline(group.get("endpoints"), reader)
        ],
    }


def _oauth_schema(schema: Any) -> Json | None:
    """``OAuthSchema``: the client's settings and the credentials it yields."""
    if not isinstance(schema, Mapping):
        return None
    return {
        key: [_provider_config(_map(c)) for c in _list(schema.get(key))]
        for key in ("client_schema", "credentials_schema")
    }


def _configs(value: Any) -> list[Json]:
    """A list of ``ProviderConfig``, declared as a list or as a mapping keyed by name."""
    return [_provider_config(_map(c)) for c in _credentials({"credentials_schema": value})]


def datasource_provider(provider: Mapping[str, Any], reader: Reader | None, icon: Icon) -> Json:
    """A datasource provider (``DatasourceProviderDeclaration``) with its datasources."""
    identity = _map(provider.get("identity"))
    datasources = []
    for datasource in _inline(provider.get("datasources"), reader):
        own = _map(datasource.get("identity"))
        entry: Json = {
            "identity": {
                "author": own.get("author"),
                "name": own.get("name"),
                "label": i18n(own.get("label")),
                "icon": icon(str(own.get("icon") or "")),
            },
            "parameters": [
                _parameter(_map(p), tool=False, described=True) for p in _list(datasource.get("parameters"))
            ],
            "description": i18n(datasource.get("description")),
        }
        datasources.append(_with_output_schema(entry, datasource))
    return {
        "identity": {
            "author": identity.get("author"),
            "name": identity.get("name"),
            "description": i18n(identity.get("description")),
            "icon": icon(str(identity.get("icon") or "")),
            "label": i18n(identity.get("label")),
            "tags": _list(identity.get("tags")),
        },
        "credentials_schema": _configs(provider.get("credentials_schema")),
        "oauth_schema": _oauth_schema(provider.get("oauth_schema")),
        "provider_type": provider.get("provider_type"),
        "datasources": datasources,
    }


def trigger_provider(provider: Mapping[str, Any], reader: Reader | None, icon: Icon) -> Json:
    """A trigger provider (``TriggerProviderDeclaration``): its subscription settings, how a
    subscription is made, and its events."""
    constructor = provider.get("subscription_constructor")
    made: Json | None = None
    if isinstance(constructor, Mapping):
        made = {
            "parameters": [_event_parameter(_map(p)) for p in _list(constructor.get("parameters"))],
            "credentials_schema": _configs(constructor.get("credentials_schema")),
        }
        if isinstance(constructor.get("oauth_schema"), Mapping):
            made["oauth_schema"] = _oauth_schema(constructor["oauth_schema"])
    events = []
    for event in _inline(provider.get("events"), reader):
        entry: Json = {
            "identity": _item_identity(event),
            "parameters": [_event_parameter(_map(p)) for p in _list(event.get("parameters"))],
            "description": i18n(event.get("description")),
        }
        events.append(_with_output_schema(entry, event))
    return {
        "identity": _provider_identity(provider, icon),
        "subscription_schema": _configs(provider.get("subscription_schema")),
        "subscription_constructor": made,
        "events": events,
    }


def plugin_declaration(
    manifest: Mapping[str, Any],
    icon: Icon,
    *,
    reader: Reader | None = None,
    tools: list[Any] | None = None,
    models: list[Any] | None = None,
    agent_strategies: list[Any] | None = None,
    endpoints: list[Any] | None = None,
    datasources: list[Any] | None = None,
    triggers: list[Any] | None = None,
) -> Json:
    """The whole declaration. Providers come from the files the manifest names (``reader``) or,
    for a remote plugin, from the declarations its SDK sent (``tools``, ``models``, ...)."""
    manifest = _plain(manifest)
    plugins = _map(manifest.get("plugins"))
    meta = _map(manifest.get("meta"))
    runner = _map(meta.get("runner"))
    resource = _map(manifest.get("resource"))
    out: Json = {
        "version": str(manifest.get("version") or ""),
        "type": manifest.get("type") or "plugin",
        "author": manifest.get("author"),
        "name": manifest.get("name"),
        "label": i18n(manifest.get("label")),
        "description": i18n(manifest.get("description")),
        "icon": icon(str(manifest.get("icon") or "")),
        "icon_dark": icon(str(manifest.get("icon_dark") or "")),
        "resource": {
            "memory": int(resource.get("memory") or 0),
            **({"permission": resource["permission"]} if resource.get("permission") else {}),
        },
        "plugins": {
            key: [x for x in _list(plugins.get(key)) if isinstance(x, str)]
            for key in ("tools", "models", "endpoints", "agent_strategies", "datasources", "triggers")
        },
        "meta": {
            "version": str(meta.get("version") or ""),
            "arch": _list(meta.get("arch")),
            "runner": {
                "language": runner.get("language"),
                "version": str(runner.get("version") or ""),
                "entrypoint": runner.get("entrypoint"),
            },
            "minimum_dify_version": meta.get("minimum_dify_version"),
        },
        "tags": _list(manifest.get("tags")),
        "created_at": manifest.get("created_at") or "0001-01-01T00:00:00Z",
        "verified": False,
    }
    for optional in ("privacy", "repo"):
        if manifest.get(optional):
            out[optional] = manifest[optional]

    def last(key: str, sent: list[Any] | None) -> Mapping[str, Any] | None:
        """The provider of a kind: the last file the manifest names (as upstream keeps it), or
        the last declaration a remote plugin sent."""
        sources = [reader.yaml(f) for f in out["plugins"][key]] if reader else _list(sent)
        return _map(sources[-1]) if sources else None

    def plugins_fill_in(identity: Json) -> None:
        """A provider declared without a description or tags takes the plugin's, as upstream."""
        if not identity["description"]["en_US"]:
            identity["description"] = out["description"]
        identity["tags"] = identity["tags"] or out["tags"]

    if (provider := last("tools", tools)) is not None:
        out["tool"] = tool_provider(provider, reader, icon)
        plugins_fill_in(out["tool"]["identity"])
    if (provider := last("models", models)) is not None:
        out["model"] = model_provider(provider, reader, icon)
        out["model"]["description"] = out["model"]["description"] or out["description"]
    if (provider := last("agent_strategies", agent_strategies)) is not None:
        out["agent_strategy"] = agent_provider(provider, reader, icon)
    if (provider := last("endpoints", endpoints)) is not None:
        out["endpoint"] = endpoint_provider(provider, reader)
    if (provider := last("datasources", datasources)) is not None:
        out["datasource"] = datasource_provider(provider, reader, icon)
    if (provider := last("triggers", triggers)) is not None:
        out["trigger"] = trigger_provider(provider, reader, icon)
        plugins_fill_in(out["trigger"]["identity"])
    return out


def category(declaration: Mapping[str, Any]) -> str:
    """Upstream's category of a declaration (``PluginDeclaration.Category``)."""
    plugins = _map(declaration.get("plugins"))
    for key, name in (
        ("tool", "tool"),
        ("model", "model"),
        ("datasource", "datasource"),
        ("agent_strategy", "agent-strategy"),
        ("trigger", "trigger"),
    ):
        plural = {"agent_strategy": "agent_strategies"}.get(key, f"{key}s")
        if declaration.get(key) or plugins.get(plural):
            return name
    return "extension"


def checksum(declaration: Mapping[str, Any]) -> str:
    """A stable sha256 of what Dify is shown: it changes whenever the declaration does."""
    return hashlib.sha256(json.dumps(declaration, sort_keys=True, default=str).encode()).hexdigest()


def local(plugin_dir: Path, assets: Mapping[str, str]) -> Json:
    """The declaration of a plugin directory; ``assets`` maps its ``_assets`` names to ids."""
    reader = Reader(plugin_dir)
    manifest = reader.yaml("manifest.yaml")
    try:
        return plugin_declaration(manifest, lambda name: assets.get(name, name), reader=reader)
    except ManifestError:
        raise
    except (TypeError, ValueError, AttributeError) as exc:
        raise ManifestError(f"{plugin_dir.name}: declaration not readable: {exc}") from None
