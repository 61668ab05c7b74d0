"""The ``endpoints`` table: every query names its tenant, except the public hook's lookup.

Rows as upstream keeps them (``models.Endpoint`` in langgenius/dify-plugin-daemon): a UUIDv7
id, a hook id of 16 lowercase letters and digits (unique across tenants, it is the public
URL), the plugin (by ``author/name``, so an upgrade keeps its endpoints), ``enabled``,
``expired_at`` and the settings. The hook id is drawn from ``secrets``: knowing it is what lets
anyone call the endpoint.
"""

from __future__ import annotations

import datetime as dt
import os
import secrets
import string
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa

if TYPE_CHECKING:
    from daemon.state import Database

HOOK_ALPHABET = string.ascii_lowercase + string.digits
HOOK_LENGTH = 16
EXPIRES = dt.datetime(2050, 1, 1, tzinfo=dt.UTC)  # upstream sets every endpoint's expiry to this


def _table_v1(metadata: sa.MetaData) -> sa.Table:
    """The table as its first migration step makes it. When a later step changes it, define the
    live :data:`ENDPOINTS` on its own and leave this as it is: a step's definition never moves."""
    return sa.Table(
        "endpoints",
        metadata,
        sa.Column("id", sa.String(36), primary_key=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("name", sa.String(127), nullable=False),
        sa.Column("hook_id", sa.String(127), nullable=False, unique=True),
        sa.Column("tenant_id", sa.String(64), nullable=False),
        sa.Column("user_id", sa.String(256), nullable=False),
        sa.Column("plugin_id", sa.String(512), nullable=False),
        sa.Column("expired_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("enabled", sa.Boolean, nullable=False),
        sa.Column("settings", sa.JSON, nullable=False),
        sa.Index("ix_endpoints_tenant_plugin", "tenant_id", "plugin_id", "created_at"),
    )


def create_table(connection: sa.Connection) -> None:
    """Migration step: the ``endpoints`` table."""
    frozen = sa.MetaData()
    _table_v1(frozen)
    frozen.create_all(connection)


ENDPOINTS = _table_v1(sa.MetaData())


def uuid7() -> str:
    """A time-ordered UUID (version 7), as upstream's ids are: 48 bits of milliseconds, then random."""
    value = (time.time_ns() // 1_000_000) << 80 | int.from_bytes(os.urandom(10)) & ((1 << 80) - 1)
    value = value & ~(0xF << 76) | 0x7 << 76  # version
    value = value & ~(0x3 << 62) | 0x2 << 62  # variant
    return str(uuid.UUID(int=value))


def new_hook_id() -> str:
    return "".join(secrets.choice(HOOK_ALPHABET) for _ in range(HOOK_LENGTH))


def _utc(value: dt.datetime) -> dt.datetime:
    return value.replace(tzinfo=dt.UTC) if value.tzinfo is None else value.astimezone(dt.UTC)


def _rfc3339(value: dt.datetime) -> str:
    return _utc(value).isoformat().replace("+00:00", "Z")


@dataclass(frozen=True)
class Endpoint:
    id: str
    created_at: dt.datetime
    updated_at: dt.datetime
    name: str
    hook_id: str
    tenant_id: str
    user_id: str
    plugin_id: str
    expired_at: dt.datetime
    enabled: bool
    settings: Mapping[str, Any]

    @classmethod
    def _of(cls, row: sa.Row[Any]) -> Endpoint:
        values = row._asdict()
        for column in ("created_at", "updated_at", "expired_at"):
            values[column] = _utc(values[column])
        values["enabled"] = bool(values["enabled"])
        values["settings"] = dict(values["settings"] or {})
        return cls(**values)

    def record(self, settings: Mapping[str, Any], declaration: Mapping[str, Any]) -> dict[str, Any]:
        """Upstream's JSON of an endpoint, with the settings and declaration a listing shows."""
        return {
            "id": self.id,
            "created_at": _rfc3339(self.created_at),
            "updated_at": _rfc3339(self.updated_at),
            "name": self.name,
            "hook_id": self.hook_id,
            "tenant_id": self.tenant_id,
            "user_id": self.user_id,
            "plugin_id": self.plugin_id,
            "expired_at": _rfc3339(self.expired_at),
            "enabled": self.enabled,
            "settings": dict(settings),
            "declaration": dict(declaration),
        }


def remove_of_plugin(connection: sa.Connection, tenant_id: str, plugin_id: str) -> int:
    """Delete the tenant's endpoints of ``plugin_id`` (an uninstall, in its transaction): how many."""
    where = (ENDPOINTS.c.tenant_id == tenant_id, ENDPOINTS.c.plugin_id == plugin_id)
    return int(connection.execute(ENDPOINTS.delete().where(*where)).rowcount or 0)


class Endpoints:
    """Queries on the table, each in one transaction of the daemon's database."""

    def __init__(self, database: Database) -> None:
        self.database = database

    async def create(
        self, tenant_id: str, user_id: str, plugin_id: str, name: str, settings: Mapping[str, Any]
    ) -> Endpoint:
        now = dt.datetime.now(dt.UTC)
        endpoint = Endpoint(
            id=uuid7(),
            created_at=now,
            updated_at=now,
            name=name,
            hook_id=new_hook_id(),
            tenant_id=tenant_id,
            user_id=user_id,
            plugin_id=plugin_id,
            expired_at=EXPIRES,
            enabled=True,
            settings=dict(settings),
        )

        def insert(connection: sa.Connection) -> Endpoint:
            row = endpoint
            for _ in range(5):  # 36**16 hook ids: a collision is all but impossible, but not an error
                taken = connection.execute(
                    sa.select(ENDPOINTS.c.id).where(ENDPOINTS.c.hook_id == row.hook_id)
                )
                if taken.first() is None:
                    break
                row = replace(row, hook_id=new_hook_id())
            connection.execute(ENDPOINTS.insert().values(**row.__dict__))
            return row

        return await self.database.run(insert)

    async def page(
        self, tenant_id: str, page: int, size: int, plugin_id: str | None = None
    ) -> list[Endpoint]:
        """The tenant's endpoints (of one plugin), newest first, as upstream orders them."""
        query = sa.select(ENDPOINTS).where(ENDPOINTS.c.tenant_id == tenant_id)
        if plugin_id is not None:
            query = query.where(ENDPOINTS.c.plugin_id == plugin_id)
        query = query.order_by(ENDPOINTS.c.created_at.desc(), ENDPOINTS.c.id.desc())
        query = query.offset((page - 1) * size).limit(size)
        rows = await self.database.run(lambda c: c.execute(query).all())
        return [Endpoint._of(row) for row in rows]

    async def counts(self, tenant_id: str) -> dict[str, tuple[int, int]]:
        """Per plugin id, how many endpoints the tenant has set up, and how many are enabled
        (``endpoints_setups`` and ``endpoints_active`` of an installation, as upstream lists them)."""
        enabled = sa.func.sum(sa.case((ENDPOINTS.c.enabled, 1), else_=0))
        query = (
            sa.select(ENDPOINTS.c.plugin_id, sa.func.count(), enabled)
            .where(ENDPOINTS.c.tenant_id == tenant_id)
            .group_by(ENDPOINTS.c.plugin_id)
        )
        rows = await self.database.run(lambda c: c.execute(query).all())
        return {plugin_id: (int(total), int(active or 0)) for plugin_id, total, active in rows}

    async def get(self, tenant_id: str, endpoint_id: str) -> Endpoint | None:
        query = sa.select(ENDPOINTS).where(ENDPOINTS.c.tenant_id == tenant_id, ENDPOINTS.c.id == endpoint_id)
        row = await self.database.run(lambda c: c.execute(query).first())
        return Endpoint._of(row) if row is not None else None

    async def by_hook(self, hook_id: str) -> Endpoint | None:
        """The endpoint a public URL names, whichever tenant it belongs to."""
        query = sa.select(ENDPOINTS).where(ENDPOINTS.c.hook_id == hook_id)
        row = await self.database.run(lambda c: c.execute(query).first())
        return Endpoint._of(row) if row is not None else None

    async def change(self, tenant_id: str, endpoint_id: str, **values: Any) -> Endpoint | None:
        """Set ``values`` on the tenant's endpoint; the row after, or None if it has none by that id."""
        where = (ENDPOINTS.c.tenant_id == tenant_id, ENDPOINTS.c.id == endpoint_id)

        def update(connection: sa.Connection) -> Endpoint | None:
            changed = connection.execute(
                ENDPOINTS.update().where(*where).values(updated_at=dt.datetime.now(dt.UTC), **values)
            )
            if changed.rowcount == 0:
                return None
            row = connection.execute(sa.select(ENDPOINTS).where(*where)).first()
            return Endpoint._of(row) if row is not None else None

        return await self.database.run(update)

    async def remove(self, tenant_id: str, endpoint_id: str) -> bool:
        where = (ENDPOINTS.c.tenant_id == tenant_id, ENDPOINTS.c.id == endpoint_id)
        deleted = await self.database.run(lambda c: c.execute(ENDPOINTS.delete().where(*where)).rowcount)
        return bool(deleted)
