"""Storage for backwards invocations: namespaced per tenant and plugin, hex on the wire."""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from daemon.runtime.backwards import BackwardsError, BackwardsServices
from daemon.state import Database, PluginStorage
from daemon.state.storage import import_legacy


@pytest.fixture
def services(database: Database) -> BackwardsServices:
    return BackwardsServices(PluginStorage(database))


def call(services: BackwardsServices, tenant: str, plugin: str, **request: Any) -> Any:
    return asyncio.run(services.handle(tenant, plugin, {"type": "storage", "request": request}))


def test_set_get_exist_del(services: BackwardsServices) -> None:
    assert call(services, "t1", "a/b", opt="exist", key="k") == {"data": False}
    assert call(services, "t1", "a/b", opt="set", key="k", value=b"\x00v\xff".hex()) == {"data": "ok"}
    assert call(services, "t1", "a/b", opt="get", key="k") == {"data": "0076ff"}
    assert call(services, "t1", "a/b", opt="exist", key="k") == {"data": True}
    assert call(services, "t1", "a/b", opt="set", key="k", value="02") == {"data": "ok"}
    assert call(services, "t1", "a/b", opt="get", key="k") == {"data": "02"}
    assert call(services, "t1", "a/b", opt="del", key="k") == {"data": "ok"}
    assert call(services, "t1", "a/b", opt="exist", key="k") == {"data": False}


def test_the_longest_key_and_the_largest_value_are_kept_whole(services: BackwardsServices) -> None:
    key, value = "ключ" * 64, bytes(range(256)) * 4096  # 256 characters; 1 MiB
    assert call(services, "t1", "a/b", opt="set", key=key, value=value.hex()) == {"data": "ok"}
    assert call(services, "t1", "a/b", opt="get", key=key) == {"data": value.hex()}


def test_a_namespace_holds_at_most_its_quota_of_keys_and_values(database: Database) -> None:
    services = BackwardsServices(PluginStorage(database, max_bytes=4096))
    kib = (b"v" * 1024).hex()
    for i in range(3):
        assert call(services, "t1", "a/b", opt="set", key=f"k{i}", value=kib) == {"data": "ok"}
    with pytest.raises(BackwardsError, match="storage is full"):
        call(services, "t1", "a/b", opt="set", key="k3", value=kib)  # 4 KiB of values, plus the keys
    assert call(services, "t1", "a/b", opt="exist", key="k3") == {"data": False}  # nothing written
    assert call(services, "t1", "a/b", opt="set", key="k0", value=kib) == {"data": "ok"}  # replaced
    assert call(services, "t1", "a/b", opt="set", key="k3", value="00") == {"data": "ok"}  # it fits
    assert call(services, "t2", "a/b", opt="set", key="k9", value=kib) == {"data": "ok"}  # per tenant
    assert call(services, "t1", "a/c", opt="set", key="k9", value=kib) == {"data": "ok"}  # per plugin
    assert call(services, "t1", "a/b", opt="del", key="k1") == {"data": "ok"}
    assert call(services, "t1", "a/b", opt="set", key="k4", value=kib) == {"data": "ok"}  # room again


def test_keys_are_never_visible_across_tenants_or_plugins(services: BackwardsServices) -> None:
    call(services, "t1", "a/b", opt="set", key="k", value="01")
    for tenant, plugin in [("t2", "a/b"), ("t1", "a/c")]:
        assert call(services, tenant, plugin, opt="exist", key="k") == {"data": False}
        with pytest.raises(BackwardsError, match="not found"):
            call(services, tenant, plugin, opt="get", key="k")


def test_data_survives_a_restart(tmp_path: Path) -> None:
    first = Database.sqlite(tmp_path / "s.sqlite3")
    first.migrate()
    asyncio.run(PluginStorage(first).set("t", "p", "k", b"v"))
    first.close()
    second = Database.sqlite(tmp_path / "s.sqlite3")
    try:
        assert second.migrate() == []
        assert asyncio.run(PluginStorage(second).get("t", "p", "k")) == b"v"
    finally:
        second.close()


@pytest.mark.parametrize(
    ("request_", "message"),
    [
        ({"opt": "set", "key": "k", "value": "zz"}, "hex string"),
        ({"opt": "set", "key": "k"}, "hex string"),
        ({"opt": "set", "key": "k", "value": "00" * (1024 * 1024 + 1)}, "larger than 1048576 bytes"),
        ({"opt": "get", "key": ""}, "1 to 256 characters"),
        ({"opt": "get", "key": "k" * 257}, "1 to 256 characters"),
        ({"opt": "get", "key": 5}, "1 to 256 characters"),
        ({"opt": "rename", "key": "k"}, "'rename' is not supported"),
    ],
)
def test_bad_storage_requests_are_refused(services: BackwardsServices, request_: Any, message: str) -> None:
    with pytest.raises(BackwardsError, match=message):
        call(services, "t", "p", **request_)


def test_other_invocation_types_are_refused_at_once(services: BackwardsServices) -> None:
    with pytest.raises(BackwardsError, match="'model' is not supported by this daemon"):
        asyncio.run(services.handle("t", "p", {"type": "model", "request": {}}))


@pytest.fixture
def sqlite_database(tmp_path: Path) -> Iterator[Database]:
    database = Database.sqlite(tmp_path / "state.sqlite3")
    database.migrate()
    yield database
    database.close()


def test_the_database_is_for_the_daemons_user_only_even_if_it_was_not(tmp_path: Path) -> None:
    """Every tenant's plugin data is in it: no group or other access, WAL files included."""
    path = tmp_path / "s.sqlite3"
    path.touch()
    path.chmod(0o644)  # as an older daemon left it
    database = Database.sqlite(path)
    database.migrate()
    asyncio.run(PluginStorage(database).set("t", "p", "k", b"v"))
    modes = {f.name: oct(f.stat().st_mode & 0o777) for f in tmp_path.iterdir()}
    database.close()
    assert modes == {"s.sqlite3": "0o600", "s.sqlite3-wal": "0o600", "s.sqlite3-shm": "0o600"}


def test_an_older_daemons_storage_file_is_imported_once(tmp_path: Path, sqlite_database: Database) -> None:
    """Rows of storage.sqlite3 join the database; a key already there keeps its newer value."""
    legacy = tmp_path / "storage.sqlite3"
    old = sqlite3.connect(legacy, isolation_level=None)
    old.execute("PRAGMA journal_mode=WAL")
    old.execute(
        "CREATE TABLE kv (tenant TEXT NOT NULL, plugin TEXT NOT NULL,"
        " key TEXT NOT NULL, value BLOB NOT NULL, PRIMARY KEY (tenant, plugin, key))"
    )
    rows = [("t1", "a/b", "k", b"old"), ("t1", "a/b", "kept", b"\x00\xff"), ("t2", "a/b", "k", b"other")]
    old.executemany("INSERT INTO kv VALUES (?, ?, ?, ?)", rows)
    old.close()
    storage = PluginStorage(sqlite_database)
    asyncio.run(storage.set("t1", "a/b", "k", b"new"))

    assert import_legacy(sqlite_database, legacy) == 2
    assert asyncio.run(storage.get("t1", "a/b", "k")) == b"new"
    assert asyncio.run(storage.get("t1", "a/b", "kept")) == b"\x00\xff"
    assert asyncio.run(storage.get("t2", "a/b", "k")) == b"other"
    assert not legacy.exists() and (tmp_path / "storage.sqlite3.imported").is_file()
    assert import_legacy(sqlite_database, legacy) == 0  # read once


def test_a_storage_file_that_is_not_one_is_left_alone(tmp_path: Path, sqlite_database: Database) -> None:
    legacy = tmp_path / "storage.sqlite3"
    legacy.write_bytes(b"not a database")
    assert import_legacy(sqlite_database, legacy) == 0
    assert legacy.read_bytes() == b"not a database"
