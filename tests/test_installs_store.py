"""The installation tables on both databases the daemon runs on: what each query promises."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import pytest

from daemon.installs import store
from daemon.state import Database

A = "demo/fastproto:0.1.0@" + "a" * 64
B = "demo/fastproto:0.2.0@" + "b" * 64
OTHER = "demo/notes:0.1.0@" + "c" * 64


def run(database: Database, fn: Callable[[Any], Any]) -> Any:
    return database.transaction(fn)


def test_a_tenant_installs_a_plugin_id_once_and_every_change_moves_the_generation(database: Database) -> None:
    start = run(database, store.generation)
    first = run(database, lambda c: store.install(c, "t1", A, source="package", meta={"k": 1}))
    assert first is not None and first.plugin_id == "demo/fastproto" and first.meta == {"k": 1}
    assert run(database, lambda c: store.install(c, "t1", B, source="package", meta={})) is None
    assert run(database, lambda c: store.install(c, "t2", A, source="github", meta={})) is not None
    assert run(database, store.generation) == start + 2  # the refused one changed nothing
    assert [i.tenant_id for i in run(database, store.installations)] == ["t1", "t2"]

    moved = run(database, lambda c: store.upgrade(c, "t1", A, B, source="package", meta={}))
    assert moved is not None and moved.id == first.id and moved.unique_identifier == B
    assert run(database, lambda c: store.upgrade(c, "t1", A, B, source="package", meta={})) is None
    assert run(database, lambda c: store.uninstall(c, "t1", first.id)) == moved
    assert run(database, lambda c: store.uninstall(c, "t1", first.id)) is None
    assert run(database, lambda c: store.uninstall(c, "t2", first.id)) is None  # not t2's id
    assert [i.unique_identifier for i in run(database, lambda c: store.installations(c, "t2"))] == [A]
    assert run(database, store.generation) == start + 4


def test_a_package_is_kept_once_with_its_bytes(database: Database) -> None:
    run(database, lambda c: store.keep_package(c, A, b"\x00zip", {"manifest": 1}, {"name": "x"}))
    run(database, lambda c: store.keep_package(c, A, b"other", {"manifest": 2}, {"name": "y"}))
    assert run(database, lambda c: store.package_bytes(c, A)) == b"\x00zip"
    assert run(database, lambda c: store.package_decoded(c, A)) == {"manifest": 1}
    assert run(database, lambda c: store.package_declarations(c, [A, B])) == {A: {"name": "x"}}
    assert run(database, lambda c: store.kept(c, [A, B])) == {A}
    assert run(database, lambda c: store.package_bytes(c, B)) is None


def test_task_statuses_add_up_as_upstreams_do(database: Database) -> None:
    statuses = [
        store.plugin_status(i, {"label": {"en_US": i}, "icon": "i.svg"}, "package") for i in (A, OTHER)
    ]
    task = run(database, lambda c: store.create_task(c, "t1", statuses))
    assert task.status == store.RUNNING and task.total_plugins == 2 and task.completed_plugins == 0

    def status(identifier: str, message: str, state: str | None = None) -> store.Task:
        run(database, lambda c: store.set_plugin_status(c, "t1", task.id, identifier, message, state))
        found = run(database, lambda c: store.task(c, "t1", task.id))
        assert found is not None
        return found

    assert status(A, "x" * 3000, store.RUNNING).plugins[0]["message"].count("x") == store.MESSAGE_MAX
    assert status(A, "installed", store.SUCCESS).completed_plugins == 1
    assert status(A, "installed", store.SUCCESS).completed_plugins == 1  # counted once
    failed = status(OTHER, "no python", store.FAILED)
    assert failed.status == store.FAILED and failed.plugins[1]["message"] == "no python"
    assert run(database, lambda c: store.task(c, "t2", task.id)) is None  # another tenant's

    # Dropping the failed plugin leaves only successes: the task goes.
    run(database, lambda c: store.delete_task_item(c, "t1", task.id, OTHER))
    assert run(database, lambda c: store.task(c, "t1", task.id)) is None


def test_expiry_deletes_old_successes_and_fails_installs_nobody_finishes(database: Database) -> None:
    done = run(database, lambda c: store.create_task(c, "t1", [store.plugin_status(A, {}, "package")]))
    run(database, lambda c: store.set_plugin_status(c, "t1", done.id, A, "installed", store.SUCCESS))
    stuck = run(database, lambda c: store.create_task(c, "t1", [store.plugin_status(B, {}, "package")]))
    now = time.time()
    assert (
        run(database, lambda c: store.expire_tasks(c, succeeded_before=now - 60, running_before=now - 60))
        == 0
    )
    assert len(run(database, lambda c: store.tasks(c, "t1", 1, 10))) == 2
    failed = run(database, lambda c: store.expire_tasks(c, succeeded_before=now + 1, running_before=now + 1))
    assert failed == 1
    (left,) = run(database, lambda c: store.tasks(c, "t1", 1, 10))
    assert left.id == stuck.id and left.status == store.FAILED
    assert "did not finish" in left.plugins[0]["message"]


@pytest.mark.parametrize("page, size, expected", [(1, 2, [2, 1]), (2, 2, [0]), (3, 2, [])])
def test_tasks_come_newest_first_a_page_at_a_time(
    database: Database, page: int, size: int, expected: list[int]
) -> None:
    made = [run(database, lambda c: store.create_task(c, "t1", [])) for _ in range(3)]
    for n, task in enumerate(made):  # distinct creation times whatever the clock's resolution
        run(
            database,
            lambda c, n=n, task=task: c.execute(
                store.TASKS.update().where(store.TASKS.c.id == task.id).values(created_at=n)
            ),
        )
    got = run(database, lambda c: store.tasks(c, "t1", page, size))
    assert [t.id for t in got] == [made[n].id for n in expected]
