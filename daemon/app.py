"""The HTTP API: Dify's dispatch endpoints, health, and the plugin list."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import hmac
import html
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar
from urllib.parse import parse_qs, urlencode

from prometheus_client.exposition import choose_encoder
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp

from daemon import __version__, access, dispatch, isolation, management, metrics, profiling, tracepage
from daemon.config import Access, Settings
from daemon.direct import DirectDispatch
from daemon.dispatch import KINDS, BadRequest, Kind
from daemon.dispatch.answer import OneAnswer
from daemon.endpoints import hook as endpoint_hook
from daemon.endpoints import routes as endpoint_routes
from daemon.entry import DaemonApp
from daemon.installs import routes as installs
from daemon.installs.runtimes import Installations
from daemon.invocation import Invocation, new_session
from daemon.limits import BodyLimit, Budget
from daemon.manifest import ManifestError, discover
from daemon.metrics import RuntimeCollector
from daemon.packages import routes as package_routes
from daemon.resources.monitor import ResourceMonitor
from daemon.runtime import PluginUnavailable, Runtime
from daemon.runtime.backwards import BackwardsServices
from daemon.shutdown import Drain
from daemon.state import Database, DatabaseError, PluginStorage
from daemon.state.storage import import_legacy
from daemon.tracing import ServerSpans, Tracing, TracingMiddleware, public_path, setup_tracing
from daemon.wire import get_codec, tool_request

log = logging.getLogger(__name__)
_Relay = TypeVar("_Relay", bound=Invocation)
PACKAGES = "/plugin/{tenant_id}/management"


class Daemon:
    """What the routes need, built in the app's lifespan."""

    def __init__(
        self, settings: Settings, server_key: str, tracing: Tracing, database: Database | None = None
    ) -> None:
        self.settings = settings
        self.database = database
        self.server_key = server_key
        self.tracing = tracing
        self.codec = get_codec(settings.codec)
        self.design = settings.validator.value  # read per invocation: an enum's value is a descriptor call
        self.storage: PluginStorage | None = None
        self.runtime: Runtime | None = None
        self._collector: RuntimeCollector | None = None
        self.drain = Drain(settings.server_shutdown_drain_timeout)
        self.buffers = Budget(settings.session_buffer_total_bytes)
        self.profiler = profiling.Profiler()
        self.monitor: ResourceMonitor | None = None

    async def start(self) -> None:
        if self.database is None:  # the CLI opens and migrates it before the port is served
            self.database = Database.from_settings(self.settings)
            await asyncio.to_thread(self.database.migrate)
        await asyncio.to_thread(import_legacy, self.database, self.settings.legacy_storage_file)
        self.storage = PluginStorage(self.database, self.settings.persistence_storage_max_size)
        try:
            specs, errors = discover(self.settings.plugins_dir, self.settings.validator_backend)
        except ManifestError as exc:
            log.error("%s", exc)
            specs, errors = [], {str(self.settings.plugins_dir): str(exc)}
        for name, error in errors.items():
            log.error("plugin %s not loaded: %s", name, error)
        services = BackwardsServices(self.storage)
        self.runtime = Runtime(
            specs, settings=self.settings, codec=self.codec, services=services, load_errors=errors
        )
        self.runtime.installs = Installations(
            self.database,
            settings=self.settings,
            codec=self.codec,
            services=services,
            limits=package_routes.limits(self.settings),
        )
        await self.runtime.start()
        self._collector = RuntimeCollector(self.runtime.instance_states)
        metrics.REGISTRY.register(self._collector)
        runtime = self.runtime
        self.monitor = ResourceMonitor(
            self.settings, lambda: (i for p in runtime.all_pools() for i in p.instances if i is not None)
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
        if self.database is not None:
            await asyncio.to_thread(self.database.close)
        self.tracing.shutdown()

    def invocation(self, kind: type[_Relay], instance: Any, request: dict[str, Any], session: Any) -> _Relay:
        """A session's relay with this daemon's codec, deadline, design, tracing and write timeout."""
        settings = self.settings
        return kind(
            instance,
            request,
            session,
            codec=self.codec,
            timeout=settings.plugin_max_execution_timeout,
            design=self.design,
            traced=self.tracing.enabled,
            write_timeout=settings.client_write_timeout,
        )

    async def start_dispatch(self, kind: Kind, request: Request) -> Invocation:
        """A dispatch request's checks, a ready instance and its session; raises :class:`BadRequest`.

        ``request`` is Starlette's or a :class:`daemon.direct.DirectRequest`: headers, path
        parameters and the body as a stream are all that is read."""
        settings = self.settings
        assert self.runtime is not None
        if self.drain.draining:
            raise BadRequest(503, "the daemon is shutting down")
        try:
            ready = await dispatch.prepare(
                request,
                kind,
                server_key=self.server_key,
                find_pool=self.runtime.pool_for,
                on_miss=self.runtime.resolve,
                limit=settings.max_request_body_bytes,
            )
            instance = await ready.pool.acquire(settings.plugin_ready_timeout)
        except PluginUnavailable as exc:
            # Dify's client treats "plugin runtime not found" as a transient outage worth a retry.
            raise BadRequest(503, f"plugin runtime not found: {exc}") from None
        parsed = ready.parsed
        session = new_session(
            instance, ready.tool, settings=settings, tenant_id=ready.tenant, budget=self.buffers
        )
        envelope = tool_request(
            session.id,
            user_id=parsed.user_id,
            access_type=kind.type,
            action=kind.action,
            data=parsed.data.model_dump(),
            conversation_id=parsed.conversation_id,
            message_id=parsed.message_id,
            app_id=parsed.app_id,
            endpoint_id=parsed.endpoint_id,
            context=parsed.context,
        )
        return self.invocation(Invocation, instance, envelope, session)


def _error(exc: BadRequest) -> JSONResponse:
    return JSONResponse(exc.body(), status_code=exc.status)


def dispatch_endpoint(kind: Kind) -> Callable[[Request], Awaitable[Response]]:
    """The ASGI route of one dispatch kind (``daemon/direct.py`` serves most without ASGI)."""

    async def endpoint(request: Request) -> Response:
        daemon: Daemon = request.app.state.daemon
        try:
            invocation = await daemon.start_dispatch(kind, request)
        except BadRequest as exc:
            return _error(exc)
        response = OneAnswer(invocation) if kind.framing == "json" else invocation.response()
        return daemon.drain.guard(invocation.session, response)  # type: ignore[return-value]

    endpoint.__name__ = endpoint.__qualname__ = kind.action
    return endpoint


async def debugging_key(request: Request) -> Response:
    """The key a plugin author gives the SDK (REMOTE_INSTALL_KEY) to debug against this tenant."""
    daemon: Daemon = request.app.state.daemon
    try:
        dispatch.check_key(request, daemon.server_key)
        tenant = dispatch.tenant_id(request)
    except BadRequest as exc:
        return _error(exc)
    assert daemon.runtime is not None
    if daemon.runtime.remote is None:
        return _error(BadRequest(404, "remote debugging is turned off (PLUGIN_REMOTE_INSTALLING_ENABLED)"))
    key = daemon.runtime.remote.keys.key_for(tenant)
    return JSONResponse({"code": 0, "message": "success", "data": {"key": key}})


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
        "plugins": daemon.runtime.describe(request.query_params.get("tenant_id")),
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
    refused = access.check(request, daemon.settings.metrics_access, daemon.server_key, _plugin_marks(daemon))
    if refused is not None:
        return _refusal(refused, "/metrics")
    encoder, content_type = choose_encoder(request.headers.get("accept", ""))
    return Response(encoder(metrics.REGISTRY), media_type=content_type)


def _plugin_marks(daemon: Daemon) -> isolation.PluginMarks:
    base = daemon.settings.plugin_uid_base
    parent = daemon.monitor.enforcement.parent if daemon.monitor is not None else None
    return isolation.PluginMarks(range(base, base + isolation.UID_SPAN), parent)


def _debug_refusal(request: Request, daemon: Daemon, what: str) -> Response | None:
    """The debug pages' access rule: a browser without the key is sent to the sign-in form."""
    refused = access.check(request, daemon.settings.debug_access, daemon.server_key, _plugin_marks(daemon))
    if refused == 401:
        return RedirectResponse(f"/debug/login?{urlencode({'next': str(request.url)})}", status_code=303)
    return None if refused is None else _refusal(refused, what)


async def debug_traces(request: Request) -> Response:
    daemon: Daemon = request.app.state.daemon
    refused = _debug_refusal(request, daemon, "/debug/traces")
    if refused is not None:
        return refused
    ring = daemon.tracing.ring
    if ring is None:
        message = "tracing is disabled (OTEL_SDK_DISABLED=true or TRACE_RING_SPANS=0)"
        return JSONResponse({"code": -404, "message": message, "data": None}, status_code=404)
    spans = ring.snapshot()
    return HTMLResponse(tracepage.render(spans, request.query_params, daemon.settings.trace_ring_spans))


async def debug_profile(request: Request) -> Response:
    """An on-CPU flame graph of the daemon, recorded on demand (daemon/profiling.py)."""
    daemon: Daemon = request.app.state.daemon
    refused = _debug_refusal(request, daemon, "/debug/profile")
    if refused is not None:
        return refused
    return await profiling.respond(request, daemon.profiler)


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
    return _error(BadRequest(exc.status_code, message))


async def _database_error(request: Request, exc: Exception) -> Response:
    """A management route whose database is away (unreachable, or SQLite locked past its busy
    timeout): upstream's internal-error envelope, not a bare 500 and a traceback."""
    log.error("%s %s: %s", request.method, public_path(request.url.path), exc)
    return _error(BadRequest(500, "the database is unavailable, try again"))


def create_app(
    settings: Settings, server_key: str, tracing: Tracing | None = None, database: Database | None = None
) -> Starlette:
    tracing = tracing or setup_tracing(settings.trace_ring_spans, ring_bytes=settings.trace_ring_bytes)
    daemon = Daemon(settings, server_key, tracing, database)

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

    dispatch_routes = [Route(kind.path, dispatch_endpoint(kind), methods=["POST"]) for kind in KINDS]
    routes = [
        *dispatch_routes,
        *(
            Route(f"/plugin/{{tenant_id}}/management/{path}", endpoint, methods=["GET"])
            for path, endpoint in management.ROUTES
        ),
        *(
            Route(f"/plugin/{{tenant_id}}/management/{path}", endpoint, methods=["POST"])
            for path, endpoint in management.POST_ROUTES
        ),
        Route("/plugin/{tenant_id}/asset/{asset_id}", management.asset, methods=["GET"]),
        Route(package_routes.UPLOAD_PATH, package_routes.upload_package, methods=["POST"]),
        *(
            Route(f"{PACKAGES}/{path}", endpoint, methods=[method])
            for path, endpoint, method in installs.ROUTES
        ),
        Route(f"{PACKAGES}/decode/from_identifier", package_routes.decode_from_identifier, methods=["GET"]),
        Route(f"{PACKAGES}/fetch/manifest", package_routes.fetch_manifest, methods=["GET"]),
        Route(f"{PACKAGES}/fetch/readme", package_routes.fetch_readme, methods=["GET"]),
        Route("/plugin/{tenant_id}/debugging/key", debugging_key, methods=["POST"]),
        *(
            Route(f"/plugin/{{tenant_id}}/endpoint/{path}", endpoint, methods=[method])
            for path, method, endpoint in endpoint_routes.ROUTES
        ),
        # Public, as upstream: the hook id is the credential. HEAD comes with GET.
        Route("/e/{hook_id}", endpoint_hook.invoke, methods=endpoint_hook.METHODS),
        Route("/e/{hook_id}/{path:path}", endpoint_hook.invoke, methods=endpoint_hook.METHODS),
        Route("/health/check", health, methods=["GET"]),
        Route("/plugins", list_plugins, methods=["GET"]),
        Route("/metrics", prometheus_metrics, methods=["GET"]),
        Route("/debug/traces", debug_traces, methods=["GET"]),
        Route("/debug/profile", debug_profile, methods=["GET"]),
        Route("/debug/login", debug_login, methods=["GET", "POST"]),
    ]
    upload_limit = settings.max_plugin_package_size + package_routes.FORM_OVERHEAD
    larger = {package_routes.UPLOAD_SUFFIX: upload_limit}
    middleware = [Middleware(BodyLimit, limit=settings.max_request_body_bytes, larger=larger)]
    if tracing.enabled:
        templates = {route.endpoint: route.path for route in routes}
        middleware.append(Middleware(TracingMiddleware, routes=templates, untraced=untraced_paths(settings)))
    app = DaemonApp(
        routes=routes,
        middleware=middleware,
        exception_handlers={HTTPException: _http_error, DatabaseError: _database_error},
        lifespan=lifespan,
    )
    app.lean_routes(
        {route.path: route.endpoint for route in dispatch_routes}, lambda inner: _wrap(inner, middleware)
    )
    app.state.daemon = daemon
    spans = ServerSpans(untraced_paths(settings)) if tracing.enabled else None
    app.state.direct = DirectDispatch(daemon, spans)
    return app


def untraced_paths(settings: Settings) -> list[str]:
    return [p.strip() for p in settings.trace_untraced_paths.split(",") if p.strip()]


def _wrap(app: ASGIApp, middleware: list[Middleware]) -> ASGIApp:
    """``app`` inside ``middleware`` (outermost first), as Starlette stacks them."""
    for layer in reversed(middleware):
        app = layer.cls(app, *layer.args, **layer.kwargs)
    return app
