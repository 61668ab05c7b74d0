"""Which memory limit an instance runs under, and where it came from.

Precedence: the operator's per-plugin override (``PLUGIN_MEMORY_LIMITS``), then the
manifest's ``resource.memory`` when it is meaningful, then the operator-wide default
(``PLUGIN_MEMORY_LIMIT``). Of the official plugins, about half declare 1 MiB, a
placeholder no Python process fits in; a declared value below 256 MiB is therefore
treated as unset.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pydantic import ByteSize, TypeAdapter, ValidationError

MIB = 1024 * 1024
MANIFEST_MINIMUM = 256 * MIB
_SIZE = TypeAdapter(ByteSize)


@dataclass(frozen=True)
class MemoryLimit:
    bytes: int | None  # None: no limit
    source: str  # "override", "manifest", "default" or "none"
    declared: int | None = None  # the manifest's resource.memory, as written

    def describe(self) -> dict[str, Any]:
        return {"bytes": self.bytes, "source": self.source, "declared": self.declared}


def mib(n: int) -> str:
    return f"{n / MIB:.0f} MiB"


def parse_size(text: str) -> int:
    """``536870912``, ``512MiB``, ``1GiB``, ``0`` (no limit): pydantic's byte-size syntax."""
    try:
        return int(_SIZE.validate_python(text.strip()))
    except ValidationError:
        raise ValueError(f"{text.strip()!r} is not a size (examples: 536870912, 512MiB, 2GiB)") from None


def parse_overrides(text: str) -> dict[str, int]:
    """``author/name=512MiB,author/other=0``: a per-plugin limit, ``0`` for none."""
    overrides: dict[str, int] = {}
    for item in text.split(","):
        if not item.strip():
            continue
        plugin_id, sep, size = item.partition("=")
        plugin_id = plugin_id.strip()
        if not sep or "/" not in plugin_id:
            raise ValueError(f"{item.strip()!r} is not author/name=SIZE")
        overrides[plugin_id] = parse_size(size)
    return overrides


def resolve(plugin_id: str, declared: int | None, default: int, overrides: dict[str, int]) -> MemoryLimit:
    def limit(value: int, source: str) -> MemoryLimit:
        return MemoryLimit(value if value > 0 else None, source if value > 0 else "none", declared)

    if plugin_id in overrides:
        return limit(overrides[plugin_id], "override")
    if declared is not None and declared >= MANIFEST_MINIMUM:
        return limit(declared, "manifest")
    return limit(default, "default")
