"""The HTTP API: Dify's dispatch endpoints, health, and the plugin list."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator
from typing import Any

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from daemon import __version__, dispatch
from daemon.codec import get_codec, tool_request
from daemon.config import Settings
from daemon.dispatch import BadRequest
from daemon.invocation import Invocation, new_session
from daemon.manifest import ManifestError, ToolSpec, discover
from daemon.runtime import PluginPool, PluginUnavailable, Runtime
from daemon.storage import BackwardsServices, Storage

log = logging.getLogger(__name__)


class Daemon:
    """What the routes need, built in the app's lifespan."""

    def __init__(self, settings: Settings, server_key: str) -> None:
        self.settings = settings
        self.server_key = server_key
        self.codec = get_codec(settings.codec)
        self.storage: Storage | None = None
        self.runtime: Runtime | None = None

    async def start(self) -> None:
        self.storage = Storage(self.settings.storage_file)
        try:
            specs, errors = discover(self.settings.plugins_dir, self.settings.validator_backend)
        except ManifestError as exc:
            log.error("%s", exc)
            specs, errors = [], {str(self.settings.plugins_dir): str(exc)}
        for name, error in errors.items():
            log.error("plugin %s not loaded: %s", name, error)
        self.runtime = Runtime(
            specs,
            settings=self.settings,
            codec=self.codec,
            services=BackwardsServices(self.storage),
            load_errors=errors,
        )
        await self.runtime.start()
        log.info(
            "serving %d plugin(s) with the %s validator and the %s codec",
            len(self.runtime.pools),
            self.settings.validator.value,
            self.codec.name,
        )

    async def stop(self) -> None:
        if self.runtime is not None:
            await self.runtime.stop()
        if self.storage is not None:
            self.storage.close()

    def pool(self, plugin_id: str) -> PluginPool:
        assert self.runtime is not None
        pool = self.runtime.pools.get(plugin_id)
        if pool is None:
            raise BadRequest(404, f"plugin {plugin_id!r} is not installed")
        return pool


def _error(exc: BadRequest) -> JSONResponse:
    return JSONResponse(exc.body(), status_code=exc.status)


def _tool(pool: PluginPool, provider: str, tool: str | None) -> ToolSpec | None:
    spec = pool.spec.providers.get(provider)
    if spec is None:
        raise BadRequest(404, f"plugin {pool.spec.id!r} has no tool provider {provider!r}")
    if tool is None:
        return None
    found = spec.tools.get(tool)
    if found is None:
        raise BadRequest(404, f"provider {provider!r} of plugin {pool.spec.id!r} has no tool {tool!r}")
    return found


async def _dispatch(request: Request, action: str) -> Response:
    daemon: Daemon = request.app.state.daemon
    settings = daemon.settings
    try:
        dispatch.check_key(request, daemon.server_key)
        tenant = dispatch.tenant_id(request)
        plugin_id = dispatch.plugin_id(request)
        pool = daemon.pool(plugin_id)
        body = await dispatch.read_json(request, settings.max_request_body_bytes)
        if action == "invoke_tool":
            parsed = dispatch.parse(dispatch.InvokeToolRequest, body)
            tool = _tool(pool, parsed.data.provider, parsed.data.tool)
        else:
            parsed = dispatch.parse(dispatch.ValidateCredentialsRequest, body)
            tool = _tool(pool, parsed.data.provider, None)
        instance = await pool.acquire(settings.plugin_ready_timeout)
    except BadRequest as exc:
        return _error(exc)
    except PluginUnavailable as exc:
        return _error(BadRequest(503, str(exc)))
    session = new_session(instance, tool, settings=settings, tenant_id=tenant)
    envelope = tool_request(
        session.id,
        user_id=parsed.user_id,
        action=action,
        data=parsed.data.model_dump(),
        conversation_id=parsed.conversation_id,
        message_id=parsed.message_id,
        app_id=parsed.app_id,
        endpoint_id=parsed.endpoint_id,
        context=parsed.context,
    )
    invocation = Invocation(
        instance, envelope, session, codec=daemon.codec, timeout=settings.plugin_max_execution_timeout
    )
    return invocation.response()  # type: ignore[return-value]


async def invoke_tool(request: Request) -> Response:
    return await _dispatch(request, "invoke_tool")


async def validate_credentials(request: Request) -> Response:
    return await _dispatch(request, "validate_tool_credentials")


async def health(request: Request) -> Response:
    return JSONResponse({"status": "ok", "version": __version__})


async def list_plugins(request: Request) -> Response:
    daemon: Daemon = request.app.state.daemon
    try:
        dispatch.check_key(request, daemon.server_key)
    except BadRequest as exc:
        return _error(exc)
    assert daemon.runtime is not None
    body: dict[str, Any] = {
        "validator": daemon.settings.validator.value,
        "plugins": [pool.describe() for pool in daemon.runtime.pools.values()],
        "load_errors": daemon.runtime.load_errors,
    }
    return JSONResponse(body)


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    message = f"{exc.detail}: {request.method} {request.url.path}"
    return JSONResponse(
        {"code": -exc.status_code, "message": message, "data": None}, status_code=exc.status_code
    )


def create_app(settings: Settings, server_key: str) -> Starlette:
    daemon = Daemon(settings, server_key)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        await daemon.start()
        try:
            yield
        finally:
            await daemon.stop()

    app = Starlette(
        routes=[
            Route("/plugin/{tenant_id}/dispatch/tool/invoke", invoke_tool, methods=["POST"]),
            Route(
                "/plugin/{tenant_id}/dispatch/tool/validate_credentials",
                validate_credentials,
                methods=["POST"],
            ),
            Route("/health/check", health, methods=["GET"]),
            Route("/plugins", list_plugins, methods=["GET"]),
        ],
        exception_handlers={HTTPException: _http_error},
        lifespan=lifespan,
    )
    app.state.daemon = daemon
    return app
