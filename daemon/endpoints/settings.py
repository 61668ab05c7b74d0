"""An endpoint's settings against its plugin's declared ``settings`` (upstream's
``ValidateProviderConfigs`` and ``MaskConfigCredentials`` in langgenius/dify-plugin-daemon)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

MAX_FIELDS = 64

# Keys a selector setting's value must carry, by the setting's scope (model selectors).
_MODEL_SCOPE_KEYS = {
    "all": (),
    "llm": (),
    "text-embedding": (),
    "rerank": ("score_threshold", "top_n"),
    "tts": ("voice",),
    "speech2text": (),
    "moderation": (),
    "vision": ("completion_params",),
    "document": (),
    "tool-call": (),
}


class InvalidSettings(ValueError):
    pass


def check(settings: Mapping[str, Any], configs: Sequence[Mapping[str, Any]]) -> None:
    """Raise :class:`InvalidSettings` naming the first setting that breaks its declaration."""
    if len(settings) > MAX_FIELDS:
        raise InvalidSettings("too many setting fields")
    for config in configs:
        name = str(config.get("name"))
        value = settings.get(name)
        if value is None:
            if config.get("required"):
                raise InvalidSettings(f"missing required setting: {name}")
            continue
        _check_one(name, value, config)


def _check_one(name: str, value: Any, config: Mapping[str, Any]) -> None:
    kind = config.get("type")
    if kind in ("text-input", "secret-input", "select") and not isinstance(value, str):
        raise InvalidSettings(f"setting {name} is not a string")
    if kind == "select" and value not in [o.get("value") for o in config.get("options") or []]:
        raise InvalidSettings(f"setting {name} is not a valid option")
    if kind == "boolean" and not isinstance(value, bool):
        raise InvalidSettings(f"setting {name} is not a boolean")
    if kind in ("app-selector", "model-selector"):
        if not isinstance(value, Mapping):
            raise InvalidSettings(f"setting {name} is not a map")
        needed = ["app_id"] if kind == "app-selector" else ["provider", "model", "model_type"]
        scope = config.get("scope")
        if kind == "model-selector" and scope is not None:
            if scope not in _MODEL_SCOPE_KEYS:
                raise InvalidSettings(f"setting {name} is not a valid model config scope")
            needed += _MODEL_SCOPE_KEYS[scope]
        for key in needed:
            if key not in value:
                raise InvalidSettings(f"setting {name} is missing {key}")


def _secrets(configs: Sequence[Mapping[str, Any]]) -> set[str]:
    return {str(c.get("name")) for c in configs if c.get("type") == "secret-input"}


def mask(settings: Mapping[str, Any], configs: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Secret settings as listings show them: the first and last two characters of a value
    longer than six, the rest as ``*``."""
    secret = _secrets(configs)
    out = dict(settings)
    for name in secret & out.keys():
        value = out[name]
        if isinstance(value, str):
            out[name] = (
                value[:2] + "*" * (len(value) - 4) + value[-2:] if len(value) > 6 else "*" * len(value)
            )
    return out


def unmask(
    new: Mapping[str, Any], old: Mapping[str, Any], configs: Sequence[Mapping[str, Any]]
) -> dict[str, Any]:
    """An update's settings, where a secret sent back exactly as it was shown masked keeps its value."""
    shown = mask(old, configs)
    out = dict(new)
    for name in _secrets(configs) & out.keys():
        if name in old and out[name] == shown.get(name):
            out[name] = old[name]
    return out
