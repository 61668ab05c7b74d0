"""Storage for backwards invocations: namespaced per tenant and plugin, hex on the wire."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from daemon.runtime.backwards import BackwardsError, BackwardsServices
from daemon.storage import Storage


@pytest.fixture
def services(tmp_path: Path) -> BackwardsServices:
    return BackwardsServices(Storage(tmp_path / "s.sqlite3"))


def call(services: BackwardsServices, tenant: str, plugin: str, **request: Any) -> Any:
    return asyncio.run(services.handle(tenant, plugin, {"type": "storage", "request": request}))


def test_set_get_exist_del(services: BackwardsServices) -> None:
    assert call(services, "t1", "a/b", opt="exist", key="k") == {"data": False}
    assert call(services, "t1", "a/b", opt="set", key="k", value=b"\x00v\xff".hex()) == {"data": "ok"}
    assert call(services, "t1", "a/b", opt="get", key="k") == {"data": "0076ff"}
    assert call(services, "t1", "a/b", opt="exist", key="k") == {"data": True}
    assert call(services, "t1", "a/b", opt="del", key="k") == {"data": "ok"}
    assert call(services, "t1", "a/b", opt="exist", key="k") == {"data": False}


def test_keys_are_never_visible_across_tenants_or_plugins(services: BackwardsServices) -> None:
    call(services, "t1", "a/b", opt="set", key="k", value="01")
    for tenant, plugin in [("t2", "a/b"), ("t1", "a/c")]:
        assert call(services, tenant, plugin, opt="exist", key="k") == {"data": False}
        with pytest.raises(BackwardsError, match="not found"):
            call(services, tenant, plugin, opt="get", key="k")


def test_data_survives_a_restart(tmp_path: Path) -> None:
    first = Storage(tmp_path / "s.sqlite3")
    first.set("t", "p", "k", b"v")
    first.close()
    assert Storage(tmp_path / "s.sqlite3").get("t", "p", "k") == b"v"


@pytest.mark.parametrize(
    ("request_", "message"),
    [
        ({"opt": "set", "key": "k", "value": "zz"}, "hex string"),
        ({"opt": "set", "key": "k"}, "hex string"),
        ({"opt": "get", "key": ""}, "1 to 256 characters"),
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


def test_the_database_is_for_the_daemons_user_only_even_if_it_was_not(tmp_path: Path) -> None:
    """Every tenant's plugin data is in it: no group or other access, WAL files included."""
    path = tmp_path / "s.sqlite3"
    path.touch()
    path.chmod(0o644)  # as an older daemon left it
    storage = Storage(path)
    storage.set("t", "p", "k", b"v")
    modes = {f.name: oct(f.stat().st_mode & 0o777) for f in tmp_path.iterdir()}
    storage.close()
    assert modes == {"s.sqlite3": "0o600", "s.sqlite3-wal": "0o600", "s.sqlite3-shm": "0o600"}
