"""The installation routes of ``/plugin/{tenant_id}/management/``, with upstream's paths, request
bodies and answers (``internal/server/controllers/plugins.go`` and ``internal/service`` in
langgenius/dify-plugin-daemon; the client is ``api/core/plugin/impl/plugin.py`` in
langgenius/dify).

A request body that does not bind is a 400 ``PluginDaemonBadRequestError`` naming the field, as
upstream's ``BindRequest`` answers; an unknown task or package is a 404
``PluginDaemonNotFoundError``. Installing answers at once with a task id; the work runs in the
background (:mod:`daemon.installs.jobs`).
"""

from __future__ import annotations

import uuid
from collections.abc import Awaitable, Callable
from typing import Annotated, Any

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from daemon import management
from daemon.dispatch import BadRequest, check_key, tenant_id
from daemon.dispatch.request import parse, read_json
from daemon.endpoints import store as endpoint_store
from daemon.installs import jobs, store
from daemon.installs.runtimes import Installations
from daemon.packages import routes as package_routes
from daemon.packages.declaration import IDENTIFIER

MAX_PLUGINS = 64  # identifiers in one install request (upstream's bound)
MAX_LOOKUPS = 256  # ids in one batch or missing request (upstream's bound)
MAX_IN_PROGRESS = 64  # plugins a tenant may have installing at once, over every task of theirs


def _identifier(value: str) -> str:
    if not IDENTIFIER.match(value):
        raise ValueError(f"not a plugin unique identifier (author/name:version@checksum): {value[:300]!r}")
    return value


Identifier = Annotated[str, AfterValidator(_identifier)]
Text = Annotated[str, Field(min_length=1, max_length=255)]
Source = Annotated[str, Field(min_length=1, max_length=63)]  # the column's size, as upstream's


def _row_id(value: str) -> str | None:
    """``value`` as an installation or task id (every one is a UUID made here), or None: what
    is not a UUID names no row, and is never sent to the database (PostgreSQL refuses a NUL)."""
    try:
        return str(uuid.UUID(value)) if len(value) == 36 else None
    except ValueError:
        return None


Meta = Annotated[dict[str, Any], BeforeValidator(lambda v: {} if v is None else v)]


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)


class InstallBody(_Body):
    plugin_unique_identifiers: list[Identifier] = Field(min_length=1, max_length=MAX_PLUGINS)
    source: Source
    metas: Annotated[list[Meta], BeforeValidator(lambda v: [] if v is None else v)] = Field(
        default_factory=list
    )


class UpgradeBody(_Body):
    original_plugin_unique_identifier: Identifier
    new_plugin_unique_identifier: Identifier
    source: Source
    meta: Meta = Field(default_factory=dict)


class UninstallBody(_Body):
    plugin_installation_id: Text


class BatchBody(_Body):
    plugin_ids: list[str] = Field(max_length=MAX_LOOKUPS)


class MissingBody(_Body):
    plugin_unique_identifiers: list[Identifier] = Field(max_length=MAX_LOOKUPS)


async def _body(request: Request, model: type[_Body]) -> Any:
    """The JSON body as ``model``; a 400 naming each wrong field, as upstream's ``BindRequest``."""
    body = await read_json(request, request.app.state.daemon.settings.max_request_body_bytes)
    return parse(model, body, status=400)


Handler = Callable[[Request, Installations, str], Awaitable[Any]]


def route(handler: Handler) -> Callable[[Request], Awaitable[Response]]:
    """An installation endpoint: the key, the tenant, then ``handler``'s data in upstream's envelope."""

    async def endpoint(request: Request) -> Response:
        daemon = request.app.state.daemon
        try:
            check_key(request, daemon.server_key)
            tenant = tenant_id(request)
            installs = daemon.runtime.installs
            if installs is None:
                raise BadRequest(503, "the daemon is starting")
            return management.success(await handler(request, installs, tenant))
        except BadRequest as exc:
            return JSONResponse(exc.body(), status_code=exc.status)

    endpoint.__name__ = endpoint.__qualname__ = handler.__name__
    return endpoint


async def _manifest(request: Request, identifier: str) -> dict[str, Any]:
    decoded = await package_routes.store(request).get(identifier)
    if decoded is None:
        raise BadRequest(
            404, f"plugin package {identifier} not found: upload it first (install/upload/package)"
        )
    return decoded.manifest


async def _new_task(installs: Installations, tenant: str, statuses: list[dict[str, Any]]) -> store.Task:
    """A task for ``statuses``, unless the tenant already has ``MAX_IN_PROGRESS`` plugins
    installing: each is a job and maybe a runtime being prepared, so their number is bounded."""

    def create(connection: Any) -> store.Task | None:
        if store.plugins_in_progress(connection, tenant) + len(statuses) > MAX_IN_PROGRESS:
            return None
        return store.create_task(connection, tenant, statuses)

    task = await installs.database.run(create)
    if task is None:
        raise BadRequest(
            429, f"too many plugins installing for this tenant (at most {MAX_IN_PROGRESS}): wait for them"
        )
    return task


def _task_started(task_id: str) -> dict[str, Any]:
    return {"all_installed": False, "task_id": task_id}


@route
async def install_from_identifiers(request: Request, installs: Installations, tenant: str) -> Any:
    """``install/identifiers``: ``{"all_installed", "task_id"}``; a task when anything is to do."""
    body: InstallBody = await _body(request, InstallBody)
    if len(body.metas) != len(body.plugin_unique_identifiers):
        raise BadRequest(400, "the number of metas must be equal to the number of plugin unique identifiers")
    wanted = dict(zip(body.plugin_unique_identifiers, body.metas, strict=True))  # repeats count once
    have = {row.plugin_id for row in await installs.database.run(lambda c: store.installations(c, tenant))}
    if all(identifier.partition(":")[0] in have for identifier in wanted):
        return {"all_installed": True, "task_id": ""}
    statuses = [
        store.plugin_status(identifier, await _manifest(request, identifier), body.source)
        for identifier in wanted
    ]
    task = await _new_task(installs, tenant, statuses)
    for identifier, meta in wanted.items():
        installs.spawn(
            jobs.install(installs, tenant, task.id, identifier, body.source, meta),
            f"install {identifier} for {tenant}",
        )
    return _task_started(task.id)


@route
async def upgrade(request: Request, installs: Installations, tenant: str) -> Any:
    """``install/upgrade``: a task moving the tenant to the new identifier once it serves."""
    body: UpgradeBody = await _body(request, UpgradeBody)
    original, new = body.original_plugin_unique_identifier, body.new_plugin_unique_identifier
    if original == new:
        raise BadRequest(400, "original and new plugin unique identifier are the same")
    if original.partition(":")[0] != new.partition(":")[0]:
        raise BadRequest(400, "original and new plugin id are different")
    found = await installs.database.run(
        lambda c: store.installation(c, tenant, plugin_unique_identifier=original)
    )
    if found is None:
        raise BadRequest(404, "plugin installation not found for this tenant")
    status = store.plugin_status(new, await _manifest(request, new), body.source)
    task = await _new_task(installs, tenant, [status])
    installs.spawn(
        jobs.upgrade(installs, tenant, task.id, original, new, body.source, body.meta),
        f"upgrade {original} to {new} for {tenant}",
    )
    return _task_started(task.id)


@route
async def uninstall(request: Request, installs: Installations, tenant: str) -> Any:
    """``uninstall``: ``true``; an id the tenant does not have is already uninstalled (upstream)."""
    body: UninstallBody = await _body(request, UninstallBody)
    wanted = body.plugin_installation_id
    found = _row_id(wanted)

    def remove(connection: Any) -> store.Installation | None:
        row = store.uninstall(connection, tenant, found)
        if row is not None and row.runtime_type != "remote":  # upstream keeps a remote one's
            endpoint_store.remove_of_plugin(connection, tenant, row.plugin_id)
        return row

    removed = None if found is None else await installs.change(remove)
    if removed is None:
        for plugin in management.installed(request.app.state.daemon.runtime, tenant):
            if plugin.row is None and plugin.record("plugin")["id"] == wanted:
                where = (
                    "a remote-debug connection: disconnect it"
                    if plugin.runtime_type == "remote"
                    else "the plugins directory, installed for every tenant: remove its folder"
                )
                raise BadRequest(400, f"plugin {plugin.plugin_id} comes from {where}")
    return True


@route
async def list_tasks(request: Request, installs: Installations, tenant: str) -> Any:
    """``install/tasks``: a page of the tenant's tasks, newest first."""
    page, size = management.paged(request)
    found = await installs.database.run(lambda c: store.tasks(c, tenant, page, size))
    return [task.record() for task in found]


async def _task(installs: Installations, tenant: str, task_id: str) -> store.Task:
    wanted = _row_id(task_id)
    found = None if wanted is None else await installs.database.run(lambda c: store.task(c, tenant, wanted))
    if found is None:
        raise BadRequest(404, f"install task {task_id[:100]!r} not found")
    return found


@route
async def get_task(request: Request, installs: Installations, tenant: str) -> Any:
    """``install/tasks/{id}``: one task, with each plugin's status and message."""
    return (await _task(installs, tenant, request.path_params["id"])).record()


@route
async def delete_task(request: Request, installs: Installations, tenant: str) -> Any:
    task_id = _row_id(request.path_params["id"])
    if task_id is not None:
        await installs.database.run(lambda c: store.delete_task(c, tenant, task_id))
    return True


@route
async def delete_all_tasks(request: Request, installs: Installations, tenant: str) -> Any:
    await installs.database.run(lambda c: store.delete_task(c, tenant))
    return True


@route
async def delete_task_item(request: Request, installs: Installations, tenant: str) -> Any:
    """``install/tasks/{id}/delete/{identifier}``: drop one plugin from a task."""
    task_id = _row_id(request.path_params["id"])
    identifier = request.path_params["identifier"].lstrip("/")
    if not IDENTIFIER.match(identifier):
        raise BadRequest(400, f"not a plugin unique identifier: {identifier[:300]!r}")
    if task_id is not None:
        await installs.database.run(lambda c: store.delete_task_item(c, tenant, task_id, identifier))
    return True


def _installation(plugin: management.Installed, counts: dict[str, tuple[int, int]]) -> dict[str, Any]:
    """An installation as ``installation/fetch/batch`` answers it (``PluginInstallation``)."""
    record = plugin.record("plugin")
    setups, active = counts.get(plugin.plugin_id, (0, 0))
    return {
        **record,
        "runtime_type": plugin.runtime_type,
        "endpoints_setups": setups,
        "endpoints_active": active,
        "source": plugin.source,
        "meta": dict(plugin.row.meta) if plugin.row else {},
        "version": plugin.declaration["version"],
        "checksum": plugin.declared.checksum,
        "declaration": plugin.declaration,
    }


async def _everything(request: Request, installs: Installations, tenant: str) -> list[management.Installed]:
    await installs.refresh(tenant)
    return list(management.installed(request.app.state.daemon.runtime, tenant))


@route
async def fetch_batch(request: Request, installs: Installations, tenant: str) -> Any:
    """``installation/fetch/batch``: the tenant's installations of these plugin ids."""
    body: BatchBody = await _body(request, BatchBody)
    wanted = set(body.plugin_ids)
    plugins = await _everything(request, installs, tenant)
    counts = await management.endpoint_counts(request, tenant)
    return [_installation(p, counts) for p in plugins if p.plugin_id in wanted]


@route
async def missing(request: Request, installs: Installations, tenant: str) -> Any:
    """``installation/missing``: each identifier the tenant lacks, or has at another version."""
    body: MissingBody = await _body(request, MissingBody)
    current = {p.plugin_id: p.unique_identifier for p in await _everything(request, installs, tenant)}
    found = []
    for identifier in body.plugin_unique_identifiers:
        have = current.get(identifier.partition(":")[0])
        if have != identifier:
            found.append({"plugin_unique_identifier": identifier, "current_identifier": have or ""})
    return found


@route
async def fetch_identifier(request: Request, installs: Installations, tenant: str) -> Any:
    """``fetch/identifier``: whether the package is kept here (Dify then skips uploading it)."""
    identifier = await package_routes.identifier(request)
    return bool(await installs.database.run(lambda c: store.kept(c, [identifier])))


# Below ``/plugin/{tenant_id}/management/``: (path, endpoint, method), upstream's.
ROUTES = (
    ("install/identifiers", install_from_identifiers, "POST"),
    ("install/upgrade", upgrade, "POST"),
    ("install/tasks", list_tasks, "GET"),
    ("install/tasks/delete_all", delete_all_tasks, "POST"),
    ("install/tasks/{id}", get_task, "GET"),
    ("install/tasks/{id}/delete", delete_task, "POST"),
    ("install/tasks/{id}/delete/{identifier:path}", delete_task_item, "POST"),
    ("uninstall", uninstall, "POST"),
    ("installation/fetch/batch", fetch_batch, "POST"),
    ("installation/missing", missing, "POST"),
    ("fetch/identifier", fetch_identifier, "GET"),
)
