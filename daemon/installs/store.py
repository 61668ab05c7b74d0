"""Kept packages, installations and install tasks: the tables and every query on them.

The rows are upstream's (``PluginInstallation`` and ``InstallTask`` in
langgenius/dify-plugin-daemon ``internal/types/models``), so the JSON the routes answer with is
a row as upstream marshals it. A tenant has at most one installation of a plugin id (the unique
index upstream has too). Every change to installations bumps one generation counter in the same
transaction, so a daemon learns whether anything changed with one small read.

Every function here takes one SQLAlchemy connection and runs inside the caller's transaction
(:meth:`daemon.state.Database.run`).
"""

from __future__ import annotations

import datetime as dt
import json
import time
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import sqlalchemy as sa

# Upstream's task and per-plugin status values (``InstallTaskStatus``).
PENDING, RUNNING, SUCCESS, FAILED = "pending", "running", "success", "failed"
MESSAGE_MAX = 1024  # upstream keeps the first and last 512 characters of a longer message


def tables_v1(metadata: sa.MetaData) -> dict[str, sa.Table]:
    """The schema as migration ``0002_plugin_installations`` creates it (frozen: a later change
    is a new step, and a new function beside this one)."""
    stamp = (sa.Float, {"nullable": False})  # seconds since the epoch, the same on both databases
    return {
        "packages": sa.Table(
            "plugin_packages",
            metadata,
            sa.Column("unique_identifier", sa.String(512), primary_key=True),
            sa.Column("plugin_id", sa.String(255), nullable=False),
            sa.Column("package", sa.LargeBinary, nullable=False),
            sa.Column("decoded", sa.Text, nullable=False),  # manifest, readmes, signature (JSON)
            sa.Column("declaration", sa.Text, nullable=False),  # as the listings send it (JSON)
            sa.Column("created_at", stamp[0], **stamp[1]),
        ),
        "installations": sa.Table(
            "plugin_installations",
            metadata,
            sa.Column("id", sa.String(36), primary_key=True),
            sa.Column("tenant_id", sa.String(64), nullable=False),
            sa.Column("plugin_id", sa.String(255), nullable=False),
            sa.Column("plugin_unique_identifier", sa.String(512), nullable=False, index=True),
            sa.Column("runtime_type", sa.String(127), nullable=False),
            sa.Column("source", sa.String(63), nullable=False),
            sa.Column("meta", sa.Text, nullable=False),
            sa.Column("endpoints_setups", sa.Integer, nullable=False, server_default="0"),
            sa.Column("endpoints_active", sa.Integer, nullable=False, server_default="0"),
            sa.Column("created_at", stamp[0], **stamp[1]),
            sa.Column("updated_at", stamp[0], **stamp[1]),
            sa.UniqueConstraint("tenant_id", "plugin_id", name="uq_plugin_installations_tenant_plugin"),
        ),
        "tasks": sa.Table(
            "plugin_install_tasks",
            metadata,
            sa.Column("id", sa.String(36), primary_key=True),
            sa.Column("tenant_id", sa.String(64), nullable=False),
            sa.Column("status", sa.String(50), nullable=False),
            sa.Column("total_plugins", sa.Integer, nullable=False),
            sa.Column("completed_plugins", sa.Integer, nullable=False),
            sa.Column("plugins", sa.Text, nullable=False),  # per plugin status (JSON list)
            sa.Column("created_at", stamp[0], **stamp[1]),
            sa.Column("updated_at", stamp[0], **stamp[1]),
            sa.Index("ix_plugin_install_tasks_tenant_created", "tenant_id", "created_at"),
        ),
        "generation": sa.Table(
            "plugin_installations_generation",
            metadata,
            sa.Column("id", sa.Integer, primary_key=True),
            sa.Column("generation", sa.BigInteger, nullable=False),
        ),
    }


def migrate_v1(connection: sa.Connection) -> None:
    """Migration step: the installation tables, and the generation counter's one row."""
    metadata = sa.MetaData()
    made = tables_v1(metadata)
    metadata.create_all(connection)
    connection.execute(made["generation"].insert().values(id=1, generation=0))


_TABLES = tables_v1(sa.MetaData())
PACKAGES = _TABLES["packages"]
INSTALLATIONS = _TABLES["installations"]
TASKS = _TABLES["tasks"]
GENERATION = _TABLES["generation"]


def rfc3339(stamp: float) -> str:
    """A time as Go's ``time.Time`` marshals it (what Dify's pydantic models parse)."""
    return dt.datetime.fromtimestamp(stamp, dt.UTC).isoformat().replace("+00:00", "Z")


def _insert_ignoring(connection: sa.Connection, table: sa.Table, values: Mapping[str, Any]) -> bool:
    """Insert ``values`` unless a unique key of ``table`` is taken; whether a row was added."""
    if connection.dialect.name == "postgresql":
        from sqlalchemy.dialects.postgresql import insert
    else:
        from sqlalchemy.dialects.sqlite import insert  # type: ignore[assignment]
    key = next(iter(table.primary_key.columns))
    # RETURNING, not rowcount: psycopg does not report a row count for an INSERT ... ON CONFLICT.
    added = connection.execute(insert(table).values(**values).on_conflict_do_nothing().returning(key))
    return added.first() is not None


# -- packages ---------------------------------------------------------------------------------


def keep_package(
    connection: sa.Connection,
    identifier: str,
    data: bytes,
    decoded: Mapping[str, Any],
    declaration: Mapping[str, Any],
) -> None:
    """Keep an uploaded package's bytes and what was read from it (once per identifier)."""
    _insert_ignoring(
        connection,
        PACKAGES,
        {
            "unique_identifier": identifier,
            "plugin_id": identifier.partition(":")[0],
            "package": data,
            "decoded": json.dumps(decoded, ensure_ascii=False),
            "declaration": json.dumps(declaration, ensure_ascii=False),
            "created_at": time.time(),
        },
    )


def package_decoded(connection: sa.Connection, identifier: str) -> dict[str, Any] | None:
    found = connection.execute(
        sa.select(PACKAGES.c.decoded).where(PACKAGES.c.unique_identifier == identifier)
    ).scalar()
    return None if found is None else json.loads(found)


def package_declarations(connection: sa.Connection, identifiers: Iterable[str]) -> dict[str, dict[str, Any]]:
    """The listing declarations of ``identifiers`` that are kept."""
    rows = connection.execute(
        sa.select(PACKAGES.c.unique_identifier, PACKAGES.c.declaration).where(
            PACKAGES.c.unique_identifier.in_(list(identifiers))
        )
    )
    return {identifier: json.loads(text) for identifier, text in rows}


def package_bytes(connection: sa.Connection, identifier: str) -> bytes | None:
    found = connection.execute(
        sa.select(PACKAGES.c.package).where(PACKAGES.c.unique_identifier == identifier)
    ).scalar()
    return None if found is None else bytes(found)


def kept(connection: sa.Connection, identifiers: Iterable[str]) -> set[str]:
    wanted = list(identifiers)
    return set(
        connection.scalars(
            sa.select(PACKAGES.c.unique_identifier).where(PACKAGES.c.unique_identifier.in_(wanted))
        )
    )


# -- installations ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Installation:
    """One row of ``plugin_installations``: a tenant has a plugin, at one unique identifier."""

    id: str
    tenant_id: str
    plugin_id: str
    plugin_unique_identifier: str
    runtime_type: str
    source: str
    meta: Mapping[str, Any]
    endpoints_setups: int
    endpoints_active: int
    created_at: float
    updated_at: float

    @classmethod
    def of(cls, row: sa.Row[Any]) -> Installation:
        return cls(**{**row._mapping, "meta": json.loads(row.meta)})

    @property
    def unique_identifier(self) -> str:
        return self.plugin_unique_identifier

    def record(self) -> dict[str, Any]:
        """The row as upstream marshals ``models.PluginInstallation``."""
        return {
            "id": self.id,
            "created_at": rfc3339(self.created_at),
            "updated_at": rfc3339(self.updated_at),
            "tenant_id": self.tenant_id,
            "plugin_id": self.plugin_id,
            "plugin_unique_identifier": self.unique_identifier,
            "runtime_type": self.runtime_type,
            "endpoints_setups": self.endpoints_setups,
            "endpoints_active": self.endpoints_active,
            "source": self.source,
            "meta": dict(self.meta),
        }


def _bump(connection: sa.Connection) -> None:
    connection.execute(
        GENERATION.update().where(GENERATION.c.id == 1).values(generation=GENERATION.c.generation + 1)
    )


def generation(connection: sa.Connection) -> int:
    return int(
        connection.execute(sa.select(GENERATION.c.generation).where(GENERATION.c.id == 1)).scalar_one()
    )


def installations(connection: sa.Connection, tenant: str | None = None) -> list[Installation]:
    """Every installation (of one tenant), oldest first."""
    query = sa.select(INSTALLATIONS).order_by(INSTALLATIONS.c.created_at, INSTALLATIONS.c.id)
    if tenant is not None:
        query = query.where(INSTALLATIONS.c.tenant_id == tenant)
    return [Installation.of(row) for row in connection.execute(query)]


def installation(connection: sa.Connection, tenant: str, **where: str) -> Installation | None:
    """The tenant's installation with these column values (``id=``, ``plugin_id=``, ...)."""
    query = sa.select(INSTALLATIONS).where(INSTALLATIONS.c.tenant_id == tenant)
    for column, value in where.items():
        query = query.where(INSTALLATIONS.c[column] == value)
    row = connection.execute(query).first()
    return None if row is None else Installation.of(row)


def install(
    connection: sa.Connection,
    tenant: str,
    identifier: str,
    *,
    source: str,
    meta: Mapping[str, Any],
    runtime_type: str = "local",
) -> Installation | None:
    """Install ``identifier`` for ``tenant``; None if the tenant already has that plugin id."""
    now = time.time()
    values = {
        "id": str(uuid.uuid4()),
        "tenant_id": tenant,
        "plugin_id": identifier.partition(":")[0],
        "plugin_unique_identifier": identifier,
        "runtime_type": runtime_type,
        "source": source,
        "meta": json.dumps(dict(meta), ensure_ascii=False),
        "endpoints_setups": 0,
        "endpoints_active": 0,
        "created_at": now,
        "updated_at": now,
    }
    if not _insert_ignoring(connection, INSTALLATIONS, values):
        return None
    _bump(connection)
    return installation(connection, tenant, id=values["id"])


def uninstall(connection: sa.Connection, tenant: str, installation_id: str) -> Installation | None:
    """Remove the tenant's installation ``installation_id``; what was removed, if anything."""
    found = installation(connection, tenant, id=installation_id)
    if found is not None:
        connection.execute(
            INSTALLATIONS.delete().where(
                INSTALLATIONS.c.id == installation_id, INSTALLATIONS.c.tenant_id == tenant
            )
        )
        _bump(connection)
    return found


def upgrade(
    connection: sa.Connection,
    tenant: str,
    original: str,
    new: str,
    *,
    source: str,
    meta: Mapping[str, Any],
) -> Installation | None:
    """Point the tenant's installation of ``original`` at ``new`` (its id stays); None if the
    tenant no longer has ``original``."""
    result = connection.execute(
        INSTALLATIONS.update()
        .where(INSTALLATIONS.c.tenant_id == tenant, INSTALLATIONS.c.plugin_unique_identifier == original)
        .values(
            plugin_unique_identifier=new,
            source=source,
            meta=json.dumps(dict(meta), ensure_ascii=False),
            updated_at=time.time(),
        )
    )
    if result.rowcount != 1:
        return None
    _bump(connection)
    return installation(connection, tenant, plugin_unique_identifier=new)


# -- install tasks ----------------------------------------------------------------------------


@dataclass
class Task:
    """One row of ``plugin_install_tasks``, its per-plugin statuses decoded."""

    id: str
    tenant_id: str
    status: str
    total_plugins: int
    completed_plugins: int
    plugins: list[dict[str, Any]] = field(default_factory=list)
    created_at: float = 0.0
    updated_at: float = 0.0

    @classmethod
    def of(cls, row: sa.Row[Any]) -> Task:
        return cls(**{**row._mapping, "plugins": json.loads(row.plugins)})

    def record(self) -> dict[str, Any]:
        """The row as upstream marshals ``models.InstallTask`` (Dify's ``PluginInstallTask``)."""
        return {
            "id": self.id,
            "created_at": rfc3339(self.created_at),
            "updated_at": rfc3339(self.updated_at),
            "status": self.status,
            "tenant_id": self.tenant_id,
            "total_plugins": self.total_plugins,
            "completed_plugins": self.completed_plugins,
            "plugins": self.plugins,
        }


def plugin_status(identifier: str, manifest: Mapping[str, Any], source: str) -> dict[str, Any]:
    """A plugin's entry in a new task (``InstallTaskPluginStatus``): pending, labelled as its
    manifest labels it."""
    label = manifest.get("label") if isinstance(manifest.get("label"), Mapping) else {}
    return {
        "plugin_unique_identifier": identifier,
        "labels": dict(label) or {"en_US": str(manifest.get("name", ""))},
        "icon": str(manifest.get("icon") or ""),
        "icon_dark": str(manifest.get("icon_dark") or ""),
        "plugin_id": identifier.partition(":")[0],
        "status": PENDING,
        "message": "",
        "source": source,
    }


def create_task(connection: sa.Connection, tenant: str, plugins: Sequence[Mapping[str, Any]]) -> Task:
    now = time.time()
    task = Task(str(uuid.uuid4()), tenant, RUNNING, len(plugins), 0, [dict(p) for p in plugins], now, now)
    connection.execute(
        TASKS.insert().values(
            id=task.id,
            tenant_id=tenant,
            status=task.status,
            total_plugins=task.total_plugins,
            completed_plugins=0,
            plugins=json.dumps(task.plugins, ensure_ascii=False),
            created_at=now,
            updated_at=now,
        )
    )
    return task


def plugins_in_progress(connection: sa.Connection, tenant: str) -> int:
    """How many plugins of the tenant's tasks are not finished (every daemon's, from the rows)."""
    left = TASKS.c.total_plugins - TASKS.c.completed_plugins
    query = sa.select(sa.func.coalesce(sa.func.sum(left), 0)).where(
        TASKS.c.tenant_id == tenant, TASKS.c.status.in_([PENDING, RUNNING])
    )
    return int(connection.execute(query).scalar_one())


def task(connection: sa.Connection, tenant: str, task_id: str, *, lock: bool = False) -> Task | None:
    query = sa.select(TASKS).where(TASKS.c.id == task_id, TASKS.c.tenant_id == tenant)
    if lock and connection.dialect.name == "postgresql":
        query = query.with_for_update()  # SQLite's BEGIN IMMEDIATE already serialises writers
    row = connection.execute(query).first()
    return None if row is None else Task.of(row)


def tasks(connection: sa.Connection, tenant: str, page: int, size: int) -> list[Task]:
    """A page of the tenant's tasks, newest first (upstream's order)."""
    query = (
        sa.select(TASKS)
        .where(TASKS.c.tenant_id == tenant)
        .order_by(TASKS.c.created_at.desc(), TASKS.c.id)
        .offset((page - 1) * size)
        .limit(size)
    )
    return [Task.of(row) for row in connection.execute(query)]


def _save(connection: sa.Connection, found: Task) -> None:
    found.updated_at = time.time()
    connection.execute(
        TASKS.update()
        .where(TASKS.c.id == found.id)
        .values(
            status=found.status,
            completed_plugins=found.completed_plugins,
            plugins=json.dumps(found.plugins, ensure_ascii=False),
            updated_at=found.updated_at,
        )
    )


def _short(message: str) -> str:
    if len(message) > MESSAGE_MAX:
        half = MESSAGE_MAX // 2
        return message[:half] + "..." + message[-half:]
    return message


def set_plugin_status(
    connection: sa.Connection,
    tenant: str,
    task_id: str,
    identifier: str,
    message: str,
    status: str | None = None,
) -> None:
    """A plugin's message (and status) in a task, and the task's totals as upstream keeps them:
    a failed plugin fails the task; the task succeeds once every plugin has."""
    found = task(connection, tenant, task_id, lock=True)
    if found is None:
        return  # deleted by its tenant meanwhile
    entry = next((p for p in found.plugins if p["plugin_unique_identifier"] == identifier), None)
    if entry is None:
        return
    entry["message"] = _short(message)
    if status is not None:
        before, entry["status"] = entry["status"], status
        if status == SUCCESS and before != SUCCESS:
            found.completed_plugins += 1
        if status == FAILED:
            found.status = FAILED
            if before == SUCCESS:
                found.completed_plugins = max(0, found.completed_plugins - 1)
        if all(p["status"] == SUCCESS for p in found.plugins):
            found.status = SUCCESS
    _save(connection, found)


def delete_task(connection: sa.Connection, tenant: str, task_id: str | None = None) -> None:
    """Delete one of the tenant's tasks, or all of them."""
    query = TASKS.delete().where(TASKS.c.tenant_id == tenant)
    if task_id is not None:
        query = query.where(TASKS.c.id == task_id)
    connection.execute(query)


def delete_task_item(connection: sa.Connection, tenant: str, task_id: str, identifier: str) -> None:
    """Drop one plugin from a task; a task left with only successes is deleted (upstream)."""
    found = task(connection, tenant, task_id, lock=True)
    if found is None:
        return
    found.plugins = [p for p in found.plugins if p["plugin_unique_identifier"] != identifier]
    if all(p["status"] == SUCCESS for p in found.plugins):
        delete_task(connection, tenant, task_id)
    else:
        _save(connection, found)


def expire_tasks(connection: sa.Connection, *, succeeded_before: float, running_before: float) -> int:
    """Delete tasks that succeeded before ``succeeded_before`` (upstream keeps them 120 s); fail
    the ones still running since before ``running_before`` (their daemon stopped mid-install).
    Returns how many were failed."""
    connection.execute(TASKS.delete().where(TASKS.c.status == SUCCESS, TASKS.c.updated_at < succeeded_before))
    stale = connection.execute(
        sa.select(TASKS).where(TASKS.c.status.in_([PENDING, RUNNING]), TASKS.c.updated_at < running_before)
    )
    failed = 0
    for row in list(stale):
        found = Task.of(row)
        for entry in found.plugins:
            if entry["status"] in (PENDING, RUNNING):
                entry["status"] = FAILED
                entry["message"] = "the install did not finish: the daemon running it stopped or timed out"
        found.status = FAILED
        _save(connection, found)
        failed += 1
    return failed
