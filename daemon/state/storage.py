"""Plugin storage: the key/value store behind the ``storage`` backwards call.

Every key lives in a namespace of (tenant, plugin), so one tenant never sees another's data.
Daemons that share a PostgreSQL database share it, so a plugin reads what it wrote through
whichever daemon the load balancer picked.
"""

from __future__ import annotations

import contextlib
import logging
import sqlite3
from pathlib import Path

import sqlalchemy as sa

from daemon.state.database import Database, upsert

log = logging.getLogger("daemon.state")

MAX_VALUE_BYTES = 1024 * 1024
MAX_KEY_CHARS = 256

metadata = sa.MetaData()
plugin_storage = sa.Table(
    "plugin_storage",
    metadata,
    sa.Column("tenant_id", sa.Text, primary_key=True),
    sa.Column("plugin_id", sa.Text, primary_key=True),
    sa.Column("key", sa.String(MAX_KEY_CHARS), primary_key=True),
    sa.Column("value", sa.LargeBinary, nullable=False),
)


def _where(tenant: str, plugin: str, key: str) -> sa.ColumnElement[bool]:
    c = plugin_storage.c
    return sa.and_(c.tenant_id == tenant, c.plugin_id == plugin, c.key == key)


class StorageFull(Exception):
    """A write that would take a namespace past its quota; nothing was written."""


class PluginStorage:
    """A key/value store per (tenant, plugin) on the daemon's database, each namespace holding at
    most ``max_bytes`` of keys and values (upstream's ``PERSISTENCE_STORAGE_MAX_SIZE``): without a
    bound, a plugin writing new keys in a loop fills the database's disk for every tenant."""

    def __init__(self, database: Database, max_bytes: int = 100 * 1024 * 1024) -> None:
        self.database = database
        self.max_bytes = max_bytes

    async def set(self, tenant: str, plugin: str, key: str, value: bytes) -> None:
        """Store ``value`` under ``key``; :class:`StorageFull` if the namespace would pass its quota
        (the value it replaces does not count)."""
        row = {"tenant_id": tenant, "plugin_id": plugin, "key": key, "value": value}
        c = plugin_storage.c
        others = sa.select(
            sa.func.coalesce(sa.func.sum(sa.func.length(c.value) + sa.func.length(c.key)), 0)
        ).where(c.tenant_id == tenant, c.plugin_id == plugin, c.key != key)

        def write(connection: sa.Connection) -> None:
            used = int(connection.scalar(others) or 0)
            if used + len(value) + len(key) > self.max_bytes:
                raise StorageFull(
                    f"storage is full: {used} of {self.max_bytes} bytes used, "
                    f"{len(value) + len(key)} more asked (PERSISTENCE_STORAGE_MAX_SIZE)"
                )
            upsert(connection, plugin_storage, row, ("tenant_id", "plugin_id", "key"))

        await self.database.run(write)

    async def get(self, tenant: str, plugin: str, key: str) -> bytes | None:
        query = sa.select(plugin_storage.c.value).where(_where(tenant, plugin, key))
        found = await self.database.run(lambda c: c.scalar(query))
        return None if found is None else bytes(found)

    async def exists(self, tenant: str, plugin: str, key: str) -> bool:
        query = sa.select(sa.literal(1)).where(_where(tenant, plugin, key))
        return await self.database.run(lambda c: c.scalar(query)) is not None

    async def delete(self, tenant: str, plugin: str, key: str) -> bool:
        statement = plugin_storage.delete().where(_where(tenant, plugin, key))
        return bool(await self.database.run(lambda c: c.execute(statement).rowcount))


def import_legacy(database: Database, path: Path) -> int:
    """Rows of the storage file older daemons kept (``storage.sqlite3``), copied into ``database``.

    A key already in the database keeps its value there. The file is renamed to
    ``storage.sqlite3.imported`` afterwards (still mode 0600), so it is read once and kept
    until the operator deletes it. The number of rows copied.
    """
    if not path.is_file():
        return 0
    legacy = sqlite3.connect(path)
    try:
        try:
            rows = legacy.execute("SELECT tenant, plugin, key, value FROM kv").fetchall()
        except sqlite3.DatabaseError as exc:
            log.warning("storage file %s not imported: %s", path, exc)
            return 0
    finally:
        legacy.close()  # the last connection to close folds the WAL back into the file

    def copy(connection: sa.Connection) -> int:
        copied = 0
        for tenant, plugin, key, value in rows:
            here = connection.scalar(sa.select(sa.literal(1)).where(_where(tenant, plugin, key)))
            if here is None:
                connection.execute(
                    plugin_storage.insert().values(tenant_id=tenant, plugin_id=plugin, key=key, value=value)
                )
                copied += 1
        return copied

    copied = database.transaction(copy)
    path.rename(path.with_name(path.name + ".imported"))
    for suffix in ("-wal", "-shm"):
        with contextlib.suppress(FileNotFoundError):
            path.with_name(path.name + suffix).unlink()
    log.info("imported %d of %d storage row(s) from %s", copied, len(rows), path)
    return copied
