"""Backwards invocations: the services a plugin may call while it runs.

Only ``storage`` is served, from an embedded SQLite file. Every key lives in a
namespace of (tenant, plugin), so one tenant never sees another's data. Every
other invocation type is refused at once, so the plugin fails fast instead of
waiting out the SDK's 250 s response timeout.
"""

from __future__ import annotations

import asyncio
import binascii
import os
import sqlite3
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any

MAX_VALUE_BYTES = 1024 * 1024


class BackwardsError(Exception):
    """Answered to the plugin as a backwards ``error`` frame."""


class Storage:
    """A key/value store per (tenant, plugin). Thread-safe; calls block briefly."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        # Every tenant's plugin data: for the daemon's user only (SQLite gives its -wal and
        # -shm files the database file's mode).
        os.close(os.open(path, os.O_RDWR | os.O_CREAT, 0o600))
        os.chmod(path, 0o600)
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS kv (tenant TEXT NOT NULL, plugin TEXT NOT NULL,"
            " key TEXT NOT NULL, value BLOB NOT NULL, PRIMARY KEY (tenant, plugin, key))"
        )
        self._lock = threading.Lock()

    def set(self, tenant: str, plugin: str, key: str, value: bytes) -> None:
        with self._lock:
            self._db.execute(
                "INSERT OR REPLACE INTO kv (tenant, plugin, key, value) VALUES (?, ?, ?, ?)",
                (tenant, plugin, key, value),
            )

    def get(self, tenant: str, plugin: str, key: str) -> bytes | None:
        with self._lock:
            row = self._db.execute(
                "SELECT value FROM kv WHERE tenant = ? AND plugin = ? AND key = ?",
                (tenant, plugin, key),
            ).fetchone()
        return None if row is None else bytes(row[0])

    def delete(self, tenant: str, plugin: str, key: str) -> bool:
        with self._lock:
            cur = self._db.execute(
                "DELETE FROM kv WHERE tenant = ? AND plugin = ? AND key = ?", (tenant, plugin, key)
            )
        return cur.rowcount > 0

    def close(self) -> None:
        with self._lock:
            self._db.close()


class BackwardsServices:
    def __init__(self, storage: Storage) -> None:
        self.storage = storage

    async def handle(self, tenant: str, plugin: str, invocation: Mapping[str, Any]) -> Any:
        """The ``data`` of the single response frame; raises :class:`BackwardsError`."""
        kind = invocation.get("type")
        if kind != "storage":
            raise BackwardsError(f"backwards invocation type {kind!r} is not supported by this daemon")
        request = invocation.get("request")
        if not isinstance(request, Mapping):
            raise BackwardsError("storage invocation without a request object")
        return await asyncio.to_thread(self._storage, tenant, plugin, request)

    def _storage(self, tenant: str, plugin: str, request: Mapping[str, Any]) -> Any:
        opt, key = request.get("opt"), request.get("key")
        if not isinstance(key, str) or not key or len(key) > 256:
            raise BackwardsError("storage key must be a string of 1 to 256 characters")
        if opt == "set":
            value = request.get("value")
            try:
                raw = binascii.unhexlify(value) if isinstance(value, str) else None
            except (binascii.Error, ValueError):
                raw = None
            if raw is None:
                raise BackwardsError("storage value must be a hex string")
            if len(raw) > MAX_VALUE_BYTES:
                raise BackwardsError(f"storage value larger than {MAX_VALUE_BYTES} bytes")
            self.storage.set(tenant, plugin, key, raw)
            return {"data": "ok"}
        if opt == "get":
            found = self.storage.get(tenant, plugin, key)
            if found is None:
                raise BackwardsError(f"storage key {key!r} not found")
            return {"data": found.hex()}
        if opt == "exist":
            return {"data": self.storage.get(tenant, plugin, key) is not None}
        if opt == "del":
            self.storage.delete(tenant, plugin, key)
            return {"data": "ok"}
        raise BackwardsError(f"storage operation {opt!r} is not supported")
