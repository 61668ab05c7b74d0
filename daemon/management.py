"""Read-only management routes Dify's API server uses to learn what a tenant has installed.

Every plugin in the plugins directory counts as installed for every tenant: the daemon does
not install per tenant. A remote-debug plugin counts for its key's tenant only, while it is
connected. Served: ``management/list``, ``tools``, ``tool``, ``tools/check_existence``,
``models``, ``agent_strategies``, ``agent_strategy``, ``datasources``, ``datasource``,
``triggers``, ``trigger`` and ``installation/ids`` with upstream's parameters and shapes
(``internal/service/manage_plugin.go`` and ``trigger.go`` in langgenius/dify-plugin-daemon),
and ``asset/{id}``.
"""

from __future__ import annotations

import inspect
import logging
import uuid
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from daemon import declarations
from daemon.dispatch import BadRequest, check_key, parse, read_json, tenant_id
from daemon.endpoints.store import Endpoints
from daemon.installs.store import Installation, rfc3339
from daemon.manifest import ManifestError
from daemon.state import DatabaseError

log = logging.getLogger(__name__)

CATEGORIES = ("tool", "model", "agent-strategy", "datasource", "trigger", "extension")
PAGE_SIZE_MAX = 256  # upstream's bound on page_size
PAGE_MAX = 2**31 - 1  # keeps (page - 1) * page_size within a 64-bit OFFSET on either database
ASSET_MAX_BYTES = 5 * 1024 * 1024
PLUGIN_NOT_FOUND = "PluginNotFoundError"  # upstream's type for a plugin the tenant does not have
_IDS = uuid.UUID("5b0c1d52-6a53-4c1e-9f43-2f4bd0f1e6a7")  # namespace of the installation ids


@dataclass(frozen=True)
class Declared:
    """A plugin's declaration, worked out once: its checksum, and since when it is installed."""

    declaration: Mapping[str, Any]
    checksum: str
    installed_at: float

    @classmethod
    def of(cls, declaration: Mapping[str, Any], installed_at: float) -> Declared:
        return cls(declaration, declarations.checksum(declaration), installed_at)


@dataclass(frozen=True)
class Installed:
    """One plugin as a tenant has it: what upstream keeps in its installation tables."""

    tenant_id: str
    plugin_id: str
    declared: Declared
    runtime_type: str  # "local" or "remote", upstream's names
    row: Installation | None = None  # installed through the API: its database row

    @property
    def declaration(self) -> Mapping[str, Any]:
        return self.declared.declaration

    @property
    def unique_identifier(self) -> str:
        if self.row is not None:
            return self.row.unique_identifier
        return f"{self.plugin_id}:{self.declaration['version']}@{self.declared.checksum}"

    @property
    def source(self) -> str:
        if self.row is not None:
            return self.row.source
        return "remote" if self.runtime_type == "remote" else "package"

    def record(self, kind: str, provider: str = "") -> dict[str, Any]:
        """The columns of an upstream installation row (``models.Model`` plus tenant and plugin)."""
        if self.row is not None:
            created, updated = rfc3339(self.row.created_at), rfc3339(self.row.updated_at)
            key = f"{self.row.id}/{kind}/{provider}"
        else:
            created = updated = rfc3339(self.declared.installed_at)
            key = f"{self.tenant_id}/{self.plugin_id}/{kind}/{provider}"
        return {
            "id": self.row.id if self.row is not None and kind == "plugin" else str(uuid.uuid5(_IDS, key)),
            "created_at": created,
            "updated_at": updated,
            "tenant_id": self.tenant_id,
            "plugin_unique_identifier": self.unique_identifier,
            "plugin_id": self.plugin_id,
        }


def asset_files(plugin_dir: Path) -> dict[str, Path]:
    """A plugin's ``_assets`` files by upstream's id: sha256 of the bytes then the name, in hex,
    plus the name's extension (``MediaBucket.Upload`` in langgenius/dify-plugin-daemon)."""
    found: dict[str, Path] = {}
    folder = plugin_dir / "_assets"
    for path in sorted(folder.rglob("*")) if folder.is_dir() else []:
        if not path.is_file() or path.is_symlink() or path.stat().st_size > ASSET_MAX_BYTES:
            continue
        found[declarations.asset_id(path.relative_to(folder).as_posix(), path.read_bytes())] = path
    return found


assets = cache(asset_files)  # plugins-directory plugins: read once


def listing(plugin_dir: Path, found: Mapping[str, Path] | None = None) -> dict[str, Any]:
    """A plugin folder's declaration as the listings send it, its icons named by asset id."""
    found = asset_files(plugin_dir) if found is None else found
    names = {path.relative_to(plugin_dir / "_assets").as_posix(): id_ for id_, path in found.items()}
    return declarations.local(plugin_dir, names)


@cache
def local_declaration(plugin_dir: Path) -> Declared | None:
    """A plugin directory's declaration (read once), or None if it cannot be read."""
    try:
        return Declared.of(
            listing(plugin_dir, assets(plugin_dir)), (plugin_dir / "manifest.yaml").stat().st_mtime
        )
    except (ManifestError, OSError) as exc:
        log.error("plugin %s is left out of the management routes: %s", plugin_dir.name, exc)
        return None


def remote_declaration(plugin: Any) -> Declared | None:
    """A remote-debug plugin's declaration, built once from what its SDK sent."""
    cached = getattr(plugin, "_declaration", None)
    if cached is None:
        sent = plugin.declarations
        if not sent.get("manifest"):
            return None
        names = {name: declarations.asset_id(name, data) for name, data in plugin.assets.items()}
        try:
            declaration = declarations.plugin_declaration(
                sent["manifest"],
                lambda name: names.get(name, name),
                tools=sent.get("tools"),
                models=sent.get("models"),
                agent_strategies=sent.get("agent_strategies"),
                endpoints=sent.get("endpoints"),
                datasources=sent.get("datasources"),
                triggers=sent.get("triggers"),
            )
        except (TypeError, ValueError, AttributeError) as exc:
            log.error("remote plugin %s is left out of the management routes: %s", plugin.spec.id, exc)
            return None
        cached = plugin._declaration = Declared.of(declaration, plugin.connected_at)
    return cached


def remote_assets(plugin: Any) -> Mapping[str, bytes]:
    """A remote-debug plugin's uploaded files by asset id (hashed once)."""
    cached = getattr(plugin, "_asset_ids", None)
    if cached is None:
        cached = {declarations.asset_id(name, data): data for name, data in plugin.assets.items()}
        plugin._asset_ids = cached
    return cached


def installed(runtime: Any, tenant: str) -> Iterator[Installed]:
    """The tenant's plugins, each once, served by what ``Runtime.pool_for`` would choose: every
    plugins-directory one (by id), then those it installed (oldest first), then its connected
    remote-debug ones."""
    remote = runtime.remote.for_tenant(tenant) if runtime.remote is not None else {}
    rows = (
        [r for r in runtime.installs.installed(tenant) if r.plugin_id not in remote]
        if runtime.installs
        else []
    )
    mine = {row.plugin_id for row in rows}
    for plugin_id in sorted(runtime.pools):
        if plugin_id in remote or plugin_id in mine:
            continue  # the tenant's own installation or remote-debug connection serves it
        declared = local_declaration(runtime.pools[plugin_id].spec.path)
        if declared is not None:
            yield Installed(tenant, plugin_id, declared, "local")
    for row in rows:
        declaration = runtime.installs.declarations.get(row.unique_identifier)
        if declaration is not None:
            checksum = row.unique_identifier.rpartition("@")[2]
            yield Installed(
                tenant, row.plugin_id, Declared(declaration, checksum, row.created_at), row.runtime_type, row
            )
    for plugin_id, plugin in sorted(remote.items()):
        declared = remote_declaration(plugin)
        if declared is not None:
            yield Installed(tenant, plugin_id, declared, "remote")


def success(data: Any) -> JSONResponse:
    return JSONResponse({"code": 0, "message": "success", "data": data})


def paged(request: Request, page_size_max: int = PAGE_SIZE_MAX) -> tuple[int, int]:
    """``page`` (from 1) and ``page_size`` (1 to 256, or ``page_size_max``), both required as
    upstream's binding has them."""
    values = []
    for name, top in (("page", PAGE_MAX), ("page_size", page_size_max)):
        raw = request.query_params.get(name, "")
        try:
            value = int(raw)
        except ValueError:
            raise BadRequest(400, f"query parameter {name} must be an integer, got {raw!r}") from None
        if not 1 <= value <= top:
            raise BadRequest(400, f"query parameter {name} must be from 1 to {top}, got {value}")
        values.append(value)
    return values[0], values[1]


def _required(request: Request, *names: str) -> list[str]:
    values = [request.query_params.get(name, "") for name in names]
    missing = [name for name, value in zip(names, values, strict=True) if not value]
    if missing:
        raise BadRequest(400, f"missing query parameter(s): {', '.join(missing)}")
    return values


def route(handler: Callable[[Request, Any, str], Any]) -> Callable[[Request], Any]:
    """A management endpoint: the key, the tenant, then ``handler``'s data in upstream's envelope.
    A coroutine ``handler`` (one that reads a body) is awaited."""

    async def endpoint(request: Request) -> Response:
        daemon = request.app.state.daemon
        try:
            check_key(request, daemon.server_key)
            tenant = tenant_id(request)
            if daemon.runtime.installs is not None:
                await daemon.runtime.installs.refresh(tenant)  # installed through another daemon
            data = handler(request, daemon.runtime, tenant)
            return success(await data if inspect.isawaitable(data) else data)
        except BadRequest as exc:
            # Upstream answers "plugin not found" with HTTP 200 and code -404 (``ErrPluginNotFound``).
            status = 200 if exc.error_type == PLUGIN_NOT_FOUND else exc.status
            return JSONResponse(exc.body(), status_code=status)

    endpoint.__name__ = endpoint.__qualname__ = handler.__name__
    return endpoint


def _page(items: list[Any], page: int, size: int) -> list[Any]:
    return items[(page - 1) * size : page * size]


@route
async def list_plugins(request: Request, runtime: Any, tenant: str) -> Any:
    """``management/list``: ``{"list": [installation...], "total": n}`` (``ListPlugins``)."""
    page, size = paged(request)
    everything = list(installed(runtime, tenant))
    counts = await endpoint_counts(request, tenant)
    rows = []
    for plugin in _page(everything, page, size):
        record = plugin.record("plugin")
        declaration = plugin.declaration
        setups, active = counts.get(plugin.plugin_id, (0, 0))
        rows.append(
            {
                **record,
                "name": declaration["name"],
                "endpoints_active": active,
                "endpoints_setups": setups,
                "installation_id": record["id"],
                "declaration": declaration,
                "runtime_type": plugin.runtime_type,
                "version": declaration["version"],
                "source": plugin.source,
                "checksum": plugin.declared.checksum,
                "meta": dict(plugin.row.meta) if plugin.row else {},
            }
        )
    return {"list": rows, "total": len(everything)}


async def endpoint_counts(request: Request, tenant: str) -> dict[str, tuple[int, int]]:
    """Per plugin id, the tenant's endpoints set up and enabled, as an installation lists them
    (upstream keeps these counts on the installation row; here they are counted when asked)."""
    try:
        return await Endpoints(request.app.state.daemon.database).counts(tenant)
    except DatabaseError as exc:
        raise BadRequest(500, f"the database is unavailable: {exc}") from None


def _providers(runtime: Any, tenant: str, key: str) -> list[tuple[Installed, Mapping[str, Any]]]:
    return [(p, p.declaration[key]) for p in installed(runtime, tenant) if p.declaration.get(key)]


def _name(key: str, provider: Mapping[str, Any]) -> str:
    return str(provider["provider"] if key == "model" else provider["identity"]["name"])


def _row(plugin: Installed, key: str, provider: Mapping[str, Any]) -> dict[str, Any]:
    row = {
        **plugin.record(key, _name(key, provider)),
        "provider": _name(key, provider),
        "declaration": provider,
    }
    if key == "agent_strategy":
        row["meta"] = plugin.declaration["meta"]
    return row


def _listing(key: str) -> Callable[[Request, Any, str], Any]:
    def handler(request: Request, runtime: Any, tenant: str) -> Any:
        page, size = paged(request)
        return [_row(p, key, provider) for p, provider in _page(_providers(runtime, tenant, key), page, size)]

    handler.__name__ = f"list_{key}"
    return handler


def _single(key: str) -> Callable[[Request, Any, str], Any]:
    def handler(request: Request, runtime: Any, tenant: str) -> Any:
        plugin_id, provider_name = _required(request, "plugin_id", "provider")
        for plugin, provider in _providers(runtime, tenant, key):
            if plugin.plugin_id == plugin_id:
                if _name(key, provider) != provider_name:
                    break
                return _row(plugin, key, provider)
        raise BadRequest(404, "plugin not found", error_type=PLUGIN_NOT_FOUND)

    handler.__name__ = f"get_{key}"
    return handler


list_tools = route(_listing("tool"))
get_tool = route(_single("tool"))
list_models = route(_listing("model"))
list_agent_strategies = route(_listing("agent_strategy"))
get_agent_strategy = route(_single("agent_strategy"))
list_datasources = route(_listing("datasource"))
get_datasource = route(_single("datasource"))
list_triggers = route(_listing("trigger"))
get_trigger = route(_single("trigger"))


class ToolProviderId(BaseModel):
    """One entry of ``tools/check_existence`` (upstream's ``RequestCheckToolExistence``)."""

    model_config = ConfigDict(strict=True)
    plugin_id: str = Field(min_length=1)
    provider_name: str = Field(min_length=1)


class CheckToolExistence(BaseModel):
    model_config = ConfigDict(strict=True)
    provider_ids: list[ToolProviderId]


@route
async def check_tools_existence(request: Request, runtime: Any, tenant: str) -> Any:
    """``tools/check_existence``: one boolean per ``{plugin_id, provider_name}``, in order: does
    the tenant have that plugin, and is that its tool provider (``CheckToolExistence``)."""
    limit = request.app.state.daemon.settings.max_request_body_bytes
    wanted = parse(CheckToolExistence, await read_json(request, limit))
    have = {(p.plugin_id, _name("tool", provider)) for p, provider in _providers(runtime, tenant, "tool")}
    return [(w.plugin_id, w.provider_name) in have for w in wanted.provider_ids]


@route
def installed_ids(request: Request, runtime: Any, tenant: str) -> Any:
    """``{"plugin_ids": [...]}`` of one category, as upstream answers it."""
    wanted = request.query_params.get("category", "")
    if wanted not in CATEGORIES:
        raise BadRequest(400, f"invalid plugin category {wanted!r}")
    return {
        "plugin_ids": [
            p.plugin_id for p in installed(runtime, tenant) if declarations.category(p.declaration) == wanted
        ]
    }


async def asset(request: Request) -> Response:
    """The bytes of one asset, as upstream sends them (``application/octet-stream``): a local or
    installed plugin's ``_assets`` file, or a file the tenant's remote-debug plugin uploaded."""
    daemon = request.app.state.daemon
    try:
        check_key(request, daemon.server_key)
        tenant = tenant_id(request)
        wanted = request.path_params["asset_id"]
        installs = daemon.runtime.installs
        for pool in [*daemon.runtime.pools.values(), *(installs.pools() if installs else ())]:
            path = assets(pool.spec.path).get(wanted)
            if path is not None and path.is_file():
                return Response(path.read_bytes(), media_type="application/octet-stream")
        remote = daemon.runtime.remote.for_tenant(tenant) if daemon.runtime.remote is not None else {}
        for plugin in remote.values():
            data = remote_assets(plugin).get(wanted)
            if data is not None:
                return Response(data, media_type="application/octet-stream")
        raise BadRequest(404, f"no asset {wanted!r} in any plugin")
    except BadRequest as exc:
        return JSONResponse(exc.body(), status_code=exc.status)


# Below ``/plugin/{tenant_id}/management/``, upstream's paths.
ROUTES = (
    ("list", list_plugins),
    ("installation/ids", installed_ids),
    ("tools", list_tools),
    ("tool", get_tool),
    ("models", list_models),
    ("agent_strategies", list_agent_strategies),
    ("agent_strategy", get_agent_strategy),
    ("datasources", list_datasources),
    ("datasource", get_datasource),
    ("triggers", list_triggers),
    ("trigger", get_trigger),
)

# The ones upstream serves as POST (their question is a JSON body).
POST_ROUTES = (("tools/check_existence", check_tools_existence),)
