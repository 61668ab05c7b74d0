"""Plugin storage: an embedded SQLite key/value store behind the ``storage`` backwards call.

Every key lives in a namespace of (tenant, plugin), so one tenant never sees another's data.
"""

from __future__ import annotations

import os
import sqlite3
import threading
from pathlib import Path

MAX_VALUE_BYTES = 1024 * 1024


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
