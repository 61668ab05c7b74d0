"""``/plugin/{tenant_id}/endpoint/*``: what Dify's API server calls to manage a tenant's endpoints.

Paths, bodies and answers as upstream's (``internal/server/controllers/endpoint.go`` and
``internal/service/endpoint.go`` in langgenius/dify-plugin-daemon; the client is
``api/core/plugin/impl/endpoint.py`` in langgenius/dify): a request that does not bind (a
field missing, a wrong type) is HTTP 400 with ``PluginDaemonBadRequestError``; everything the
service decides is HTTP 200 with upstream's code and type (``PluginNotFoundError`` for a
plugin the tenant does not have, ``PluginDaemonNotFoundError`` for an endpoint it does not
have, ``PluginPermissionDeniedError`` for a plugin whose manifest does not ask for endpoints),
so Dify raises the matching exception. Every query names the tenant of the path: a tenant
cannot see, change or remove another's endpoint, it is simply not found.

Settings are kept as given (upstream hands them to Dify's API server to encrypt; this daemon
has no such service) and listed with secret settings masked, as upstream lists them.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Mapping
from typing import Annotated, Any, TypeVar

from pydantic import BaseModel, ConfigDict, Field
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from daemon import management
from daemon.dispatch import BadRequest, check_key, parse, read_json, tenant_id
from daemon.endpoints import settings as checks
from daemon.endpoints.store import Endpoint, Endpoints
from daemon.errors import BAD_REQUEST, INTERNAL_ERROR, NOT_FOUND, PLUGIN_NOT_FOUND, envelope
from daemon.packages.declaration import IDENTIFIER
from daemon.state import DatabaseError

log = logging.getLogger(__name__)

PAGE_SIZE_MAX = 100  # upstream's binding: ``page_size`` at most 100
PERMISSION_DENIED = "PluginPermissionDeniedError"
EMPTY_DECLARATION: Mapping[str, Any] = {"settings": [], "endpoints": []}

Required = Annotated[str, Field(min_length=1, max_length=256)]


class _Body(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")


M = TypeVar("M", bound=_Body)


class SetupBody(_Body):
    plugin_unique_identifier: Required
    user_id: Required
    name: Annotated[str, Field(min_length=1, max_length=127)]
    settings: dict[str, Any] | None = None


class EndpointBody(_Body):
    endpoint_id: Required


class UpdateBody(EndpointBody):
    user_id: Required
    name: Annotated[str, Field(min_length=1, max_length=127)]
    settings: dict[str, Any] | None = None


class Refused(Exception):
    """What the service answers with HTTP 200 and an error code, as upstream does."""

    def __init__(self, code: int, error_type: str, message: str) -> None:
        super().__init__(message)
        self.body = envelope(code, error_type, message)


def _not_found() -> Refused:
    return Refused(-404, NOT_FOUND, "endpoint not found")


def _success(data: Any) -> JSONResponse:
    return JSONResponse({"code": 0, "message": "success", "data": data})


def route(handler: Callable[[Request, str, Endpoints], Awaitable[Any]]) -> Callable[[Request], Any]:
    """The server key, the tenant, then ``handler``'s data in upstream's envelope."""

    async def endpoint(request: Request) -> Response:
        daemon = request.app.state.daemon
        try:
            check_key(request, daemon.server_key)
            tenant = tenant_id(request)
            return _success(await handler(request, tenant, Endpoints(daemon.database)))
        except BadRequest as exc:
            return JSONResponse(exc.body(), status_code=exc.status)
        except Refused as exc:
            return JSONResponse(exc.body)
        except DatabaseError as exc:
            log.error("%s: %s", request.url.path, exc)
            return JSONResponse(
                envelope(-500, INTERNAL_ERROR, "the database is unavailable"), status_code=500
            )

    endpoint.__name__ = endpoint.__qualname__ = handler.__name__
    return endpoint


async def _body(request: Request, model: type[M]) -> M:
    body = await read_json(request, request.app.state.daemon.settings.max_request_body_bytes)
    try:
        return parse(model, body)  # type: ignore[arg-type, no-any-return]
    except BadRequest as exc:  # upstream's binding answers 400 where dispatch answers 422
        raise BadRequest(400, exc.message, exc.errors) from None


async def _installed(
    request: Request, tenant: str, found: Callable[[list[management.Installed]], bool]
) -> list[management.Installed]:
    """The tenant's plugins; read its installations again first when ``found`` says they lack
    what the request names: another daemon on the same database may have installed it."""
    daemon = request.app.state.daemon
    plugins = list(management.installed(daemon.runtime, tenant))
    if not found(plugins) and daemon.runtime.installs is not None:
        await daemon.runtime.installs.refresh(tenant)
        plugins = list(management.installed(daemon.runtime, tenant))
    return plugins


async def declarations_of(
    request: Request, tenant: str, plugin_ids: set[str]
) -> dict[str, Mapping[str, Any]]:
    """The endpoint group each of ``plugin_ids`` declares as ``tenant`` has it (absent: not installed)."""
    plugins = await _installed(request, tenant, lambda ps: plugin_ids <= {p.plugin_id for p in ps})
    return {
        p.plugin_id: p.declaration.get("endpoint") or EMPTY_DECLARATION
        for p in plugins
        if p.plugin_id in plugin_ids
    }


def _listed(endpoint: Endpoint, declaration: Mapping[str, Any] | None) -> dict[str, Any]:
    if declaration is None:  # the plugin was uninstalled: upstream lists it with nothing
        return endpoint.record({}, EMPTY_DECLARATION)
    configs = declaration.get("settings") or []
    return endpoint.record(checks.mask(endpoint.settings, configs), declaration)


def _checked(settings: Mapping[str, Any], declaration: Mapping[str, Any]) -> None:
    try:
        checks.check(settings, declaration.get("settings") or [])
    except checks.InvalidSettings as exc:
        raise Refused(-400, BAD_REQUEST, f"failed to validate settings: {exc}") from None


@route
async def setup_endpoint(request: Request, tenant: str, endpoints: Endpoints) -> Any:
    body = await _body(request, SetupBody)
    identifier = body.plugin_unique_identifier
    if not IDENTIFIER.match(identifier):
        raise BadRequest(400, f"plugin_unique_identifier is not valid: {identifier[:300]}")
    plugins = await _installed(request, tenant, lambda ps: any(p.unique_identifier == identifier for p in ps))
    plugin = next((p for p in plugins if p.unique_identifier == identifier), None)
    if plugin is None:
        raise Refused(-404, PLUGIN_NOT_FOUND, "plugin not found")
    declared = plugin.declaration
    permission = (declared.get("resource") or {}).get("permission") or {}
    if not (permission.get("endpoint") or {}).get("enabled"):
        message = "permission denied, you need to enable endpoint access in plugin manifest"
        raise Refused(-403, PERMISSION_DENIED, message)
    if not declared.get("endpoint"):
        raise Refused(-400, BAD_REQUEST, "plugin does not have an endpoint")
    settings = body.settings or {}
    _checked(settings, declared["endpoint"])
    await endpoints.create(tenant, body.user_id, plugin.plugin_id, body.name, settings)
    return True


@route
async def list_endpoints(request: Request, tenant: str, endpoints: Endpoints) -> Any:
    page, size = management.paged(request, PAGE_SIZE_MAX)
    rows = await endpoints.page(tenant, page, size)
    declarations = await declarations_of(request, tenant, {e.plugin_id for e in rows})
    return [_listed(e, declarations.get(e.plugin_id)) for e in rows]


@route
async def list_plugin_endpoints(request: Request, tenant: str, endpoints: Endpoints) -> Any:
    plugin_id = request.query_params.get("plugin_id", "")
    if not plugin_id:
        raise BadRequest(400, "missing query parameter: plugin_id")
    page, size = management.paged(request, PAGE_SIZE_MAX)
    rows = await endpoints.page(tenant, page, size, plugin_id)
    declaration = (await declarations_of(request, tenant, {plugin_id} if rows else set())).get(plugin_id)
    return [_listed(e, declaration) for e in rows]


@route
async def update_endpoint(request: Request, tenant: str, endpoints: Endpoints) -> Any:
    body = await _body(request, UpdateBody)
    endpoint = await endpoints.get(tenant, body.endpoint_id)
    if endpoint is None:
        raise _not_found()
    declaration = (await declarations_of(request, tenant, {endpoint.plugin_id})).get(endpoint.plugin_id)
    if declaration is None:
        raise Refused(-404, NOT_FOUND, "failed to find plugin installation")
    configs = declaration.get("settings") or []
    settings = checks.unmask(body.settings or {}, endpoint.settings, configs)
    _checked(settings, declaration)
    if await endpoints.change(tenant, endpoint.id, name=body.name, settings=settings) is None:
        raise _not_found()  # removed meanwhile
    return True


def _switch(enabled: bool) -> Callable[[Request, str, Endpoints], Awaitable[Any]]:
    async def handler(request: Request, tenant: str, endpoints: Endpoints) -> Any:
        body = await _body(request, EndpointBody)
        if await endpoints.change(tenant, body.endpoint_id, enabled=enabled) is None:
            raise _not_found()
        return True

    handler.__name__ = "enable_endpoint" if enabled else "disable_endpoint"
    return handler


enable_endpoint = route(_switch(True))
disable_endpoint = route(_switch(False))


@route
async def remove_endpoint(request: Request, tenant: str, endpoints: Endpoints) -> Any:
    body = await _body(request, EndpointBody)
    if not await endpoints.remove(tenant, body.endpoint_id):
        raise _not_found()
    return True


# Below ``/plugin/{tenant_id}/endpoint/``, upstream's paths and methods.
ROUTES = (
    ("setup", "POST", setup_endpoint),
    ("list", "GET", list_endpoints),
    ("list/plugin", "GET", list_plugin_endpoints),
    ("update", "POST", update_endpoint),
    ("enable", "POST", enable_endpoint),
    ("disable", "POST", disable_endpoint),
    ("remove", "POST", remove_endpoint),
)
