"""The HTTP API: Dify's dispatch endpoints, health, and the plugin list."""

from __future__ import annotations

import contextlib
import gc
import hmac
import html
import logging
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import parse_qs, urlencode

from prometheus_client.exposition import choose_encoder
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from starlette.routing import Route

from daemon import __version__, access, dispatch, metrics, tracepage
from daemon.codec import get_codec, tool_request
from daemon.config import Access, Settings
from daemon.dispatch import BadRequest
from daemon.invocation import Invocation, new_session
from daemon.manifest import ManifestError, ToolSpec, discover
from daemon.metrics import RuntimeCollector
from daemon.resources.monitor import ResourceMonitor
from daemon.runtime import PluginPool, PluginUnavailable, Runtime
from daemon.storage import BackwardsServices, Storage
from daemon.tracing import Tracing, TracingMiddleware, setup_tracing

log = logging.getLogger(__name__)


class Daemon:
    """What the routes need, built in the app's lifespan."""

    def __init__(self, settings: Settings, server_key: str, tracing: Tracing) -> None:
        self.settings = settings
        self.server_key = server_key
        self.tracing = tracing
        self.codec = get_codec(settings.codec)
        self.storage: Storage | None = None
        self.runtime: Runtime | None = None
        self._collector: RuntimeCollector | None = None
        self.monitor: ResourceMonitor | None = None

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
        self._collector = RuntimeCollector(self.runtime.instance_states)
        metrics.REGISTRY.register(self._collector)
        runtime = self.runtime
        self.monitor = ResourceMonitor(
            self.settings, lambda: (i for p in runtime.pools.values() for i in p.instances if i is not None)
        )
        metrics.REGISTRY.register(self.monitor.collector)
        self.monitor.start()
        log.info(
            "serving %d plugin(s) with the %s validator and the %s codec",
            len(self.runtime.pools),
            self.settings.validator.value,
            self.codec.name,
        )

    async def stop(self) -> None:
        if self.monitor is not None:
            await self.monitor.stop()
            metrics.REGISTRY.unregister(self.monitor.collector)
        if self.runtime is not None:
            await self.runtime.stop()
        if self._collector is not None:
            metrics.REGISTRY.unregister(self._collector)
        if self.storage is not None:
            self.storage.close()
        self.tracing.shutdown()

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
        instance,
        envelope,
        session,
        codec=daemon.codec,
        timeout=settings.plugin_max_execution_timeout,
        design=settings.validator.value,
        traced=daemon.tracing.enabled,
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
        "memory_enforcement": daemon.monitor.enforcement.describe() if daemon.monitor else None,
        "plugins": [pool.describe() for pool in daemon.runtime.pools.values()],
        "load_errors": daemon.runtime.load_errors,
    }
    return JSONResponse(body)


def _refusal(status: int, what: str) -> JSONResponse:
    if status == 404:
        return JSONResponse({"code": -404, "message": f"{what} is turned off", "data": None}, status_code=404)
    message = f"{what} needs the server key (X-Api-Key or Authorization: Bearer) from this address"
    return JSONResponse({"code": -401, "message": message, "data": None}, status_code=401)


async def prometheus_metrics(request: Request) -> Response:
    daemon: Daemon = request.app.state.daemon
    refused = access.check(request, daemon.settings.metrics_access, daemon.server_key)
    if refused is not None:
        return _refusal(refused, "/metrics")
    encoder, content_type = choose_encoder(request.headers.get("accept", ""))
    return Response(encoder(metrics.REGISTRY), media_type=content_type)


async def debug_traces(request: Request) -> Response:
    daemon: Daemon = request.app.state.daemon
    refused = access.check(request, daemon.settings.debug_access, daemon.server_key)
    if refused == 401:
        return RedirectResponse(f"/debug/login?{urlencode({'next': str(request.url)})}", status_code=303)
    if refused is not None:
        return _refusal(refused, "/debug/traces")
    ring = daemon.tracing.ring
    if ring is None:
        message = "tracing is disabled (OTEL_SDK_DISABLED=true or TRACE_RING_SPANS=0)"
        return JSONResponse({"code": -404, "message": message, "data": None}, status_code=404)
    spans = ring.snapshot()
    params = request.query_params
    if "trace" in params:
        page = tracepage.render_trace(spans, params["trace"])
    elif "name" in params:
        page = tracepage.render_list(spans, params["name"], params.get("view", "recent"))
    else:
        page = tracepage.render_index(spans, daemon.settings.trace_ring_spans)
    return HTMLResponse(page)


LOGIN_FORM = """<!doctype html><html><head><meta charset='utf-8'><title>Sign in</title></head>
<body style='font:14px system-ui;margin:40px'><h1 style='font-size:18px'>plugin-daemon debug pages</h1>
<form method='post'><input type='hidden' name='next' value='{next}'>
<label>Server key <input type='password' name='key' autofocus></label> <button>Sign in</button></form>
<p style='color:#b3261e'>{error}</p></body></html>"""


async def debug_login(request: Request) -> Response:
    """A small form that trades the server key for a cookie, so a browser can open the pages."""
    daemon: Daemon = request.app.state.daemon
    if daemon.settings.debug_access is Access.OFF:
        return _refusal(404, "/debug")
    if request.method == "GET":
        nxt = request.query_params.get("next", "/debug/traces")
        return HTMLResponse(LOGIN_FORM.format(next=html.escape(nxt), error=""))
    form = parse_qs((await request.body())[:4096].decode(errors="replace"))
    key, nxt = form.get("key", [""])[0], form.get("next", ["/debug/traces"])[0]
    if not hmac.compare_digest(key.encode(), daemon.server_key.encode()):
        return HTMLResponse(LOGIN_FORM.format(next=html.escape(nxt), error="wrong key"), status_code=401)
    local = nxt.startswith("/") and not nxt.startswith("//")
    target = nxt if local or nxt.startswith(str(request.base_url)) else "/debug/traces"
    response = RedirectResponse(target, status_code=303)
    response.set_cookie(
        access.COOKIE, access.cookie_token(daemon.server_key), httponly=True, samesite="strict", path="/debug"
    )
    return response


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    message = f"{exc.detail}: {request.method} {request.url.path}"
    return JSONResponse(
        {"code": -exc.status_code, "message": message, "data": None}, status_code=exc.status_code
    )


def create_app(settings: Settings, server_key: str, tracing: Tracing | None = None) -> Starlette:
    tracing = tracing or setup_tracing(settings.trace_ring_spans)
    daemon = Daemon(settings, server_key, tracing)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        await daemon.start()
        # Everything alive now (modules, the app, settings) lives as long as the daemon; frozen,
        # the garbage collector's full passes skip it and only walk what requests leave behind.
        gc.freeze()
        try:
            yield
        finally:
            await daemon.stop()

    routes = [
        Route("/plugin/{tenant_id}/dispatch/tool/invoke", invoke_tool, methods=["POST"]),
        Route(
            "/plugin/{tenant_id}/dispatch/tool/validate_credentials",
            validate_credentials,
            methods=["POST"],
        ),
        Route("/health/check", health, methods=["GET"]),
        Route("/plugins", list_plugins, methods=["GET"]),
        Route("/metrics", prometheus_metrics, methods=["GET"]),
        Route("/debug/traces", debug_traces, methods=["GET"]),
        Route("/debug/login", debug_login, methods=["GET", "POST"]),
    ]
    middleware = []
    if tracing.enabled:
        templates = {route.endpoint: route.path for route in routes}
        middleware.append(Middleware(TracingMiddleware, routes=templates))
    app = Starlette(
        routes=routes,
        middleware=middleware,
        exception_handlers={HTTPException: _http_error},
        lifespan=lifespan,
    )
    app.state.daemon = daemon
    return app
