"""Read-only management routes Dify's API server uses to learn what a tenant has installed.

Every plugin in the plugins directory counts as installed for every tenant: the daemon does
not install per tenant. Served so far: ``management/installation/ids`` (upstream's
``ListInstalledPluginIDs``) and ``asset/{id}`` (a file of a plugin's ``_assets``, by upstream's
id); the other management routes answer 404 until they are served.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from functools import cache
from pathlib import Path
from typing import Any

import yaml
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from daemon.dispatch import BadRequest, check_key, tenant_id

# Upstream's plugin categories and the manifest key (under ``plugins``) that puts a plugin in each.
CATEGORIES: Mapping[str, str] = {
    "tool": "tools",
    "model": "models",
    "agent-strategy": "agent_strategies",
    "datasource": "datasources",
    "trigger": "triggers",
}
EXTENSION = "extension"  # endpoints only


@cache
def categories(plugin_dir: Path) -> frozenset[str]:
    """The categories a plugin's ``manifest.yaml`` declares (read once per plugin)."""
    try:
        manifest = yaml.safe_load((plugin_dir / "manifest.yaml").read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError):
        return frozenset()
    plugins = manifest.get("plugins") if isinstance(manifest, Mapping) else None
    if not isinstance(plugins, Mapping):
        return frozenset()
    found = {name for name, key in CATEGORIES.items() if plugins.get(key)}
    if not found and plugins.get("endpoints"):
        found.add(EXTENSION)
    return frozenset(found)


def success(data: Any) -> JSONResponse:
    return JSONResponse({"code": 0, "message": "success", "data": data})


async def installed_ids(request: Request) -> Response:
    """``{"plugin_ids": [...]}`` of one category, as upstream answers it."""
    daemon = request.app.state.daemon
    try:
        check_key(request, daemon.server_key)
        tenant_id(request)
        category = request.query_params.get("category", "")
        if category not in CATEGORIES and category != EXTENSION:
            raise BadRequest(400, f"invalid plugin category {category!r}")
    except BadRequest as exc:
        return JSONResponse(exc.body(), status_code=exc.status)
    pools = daemon.runtime.pools.values()
    return success({"plugin_ids": [pool.spec.id for pool in pools if category in categories(pool.spec.path)]})


ASSET_MAX_BYTES = 5 * 1024 * 1024


@cache
def assets(plugin_dir: Path) -> Mapping[str, Path]:
    """A plugin's ``_assets`` files by upstream's id: sha256 of the bytes then the name, in hex,
    plus the name's extension (``MediaBucket.Upload`` in langgenius/dify-plugin-daemon)."""
    found: dict[str, Path] = {}
    folder = plugin_dir / "_assets"
    for path in sorted(folder.rglob("*")) if folder.is_dir() else []:
        if not path.is_file() or path.is_symlink() or path.stat().st_size > ASSET_MAX_BYTES:
            continue
        name = path.relative_to(folder).as_posix()
        digest = hashlib.sha256(path.read_bytes() + name.encode()).hexdigest()
        found[digest + path.suffix] = path
    return found


async def asset(request: Request) -> Response:
    """The bytes of one asset, as upstream sends them (``application/octet-stream``)."""
    daemon = request.app.state.daemon
    try:
        check_key(request, daemon.server_key)
        tenant_id(request)
        wanted = request.path_params["asset_id"]
        for pool in daemon.runtime.pools.values():
            path = assets(pool.spec.path).get(wanted)
            if path is not None:
                return Response(path.read_bytes(), media_type="application/octet-stream")
        raise BadRequest(404, f"no asset {wanted!r} in any plugin")
    except BadRequest as exc:
        return JSONResponse(exc.body(), status_code=exc.status)
