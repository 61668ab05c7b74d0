"""The state database, on SQLite and on a real PostgreSQL server: migrations, several daemons, errors."""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import sqlalchemy as sa

from daemon import cli
from daemon.config import Settings
from daemon.state import Database, DatabaseError, PluginStorage
from daemon.state.migrations import APPLIED, STEPS, Step, apply
from daemon.state.storage import plugin_storage
from daemon.testing import REPO, Daemon, free_port
from tests.postgres import PASSWORD, PostgresServer
from tests.test_remote_debugging import NOTES, variables

CONSOLE_SCRIPT = str(Path(sys.executable).with_name("plugin-daemon"))


def recorded(database: Database) -> list[str]:
    return database.transaction(lambda c: sorted(c.scalars(sa.select(APPLIED.c.name))))


def has_table(database: Database, name: str) -> bool:
    return database.transaction(lambda c: sa.inspect(c).has_table(name))


def test_migrations_are_recorded_and_a_second_run_applies_nothing(database: Database) -> None:
    assert recorded(database) == sorted(step.name for step in STEPS)
    assert has_table(database, "plugin_storage")
    assert database.migrate() == []
    assert recorded(database) == sorted(step.name for step in STEPS)


def _create(name: str) -> Callable[[sa.Connection], None]:
    def step(connection: sa.Connection) -> None:
        metadata = sa.MetaData()
        sa.Table(name, metadata, sa.Column("n", sa.Integer))
        metadata.create_all(connection)

    return step


def test_a_step_appended_later_is_the_only_one_applied(database: Database) -> None:
    """Steps are known by name: a database that has the old ones gets just the new one."""
    steps = [*STEPS, Step("9001_later", _create("later"))]
    assert apply(database.engine, steps) == ["9001_later"]
    assert has_table(database, "later")
    assert apply(database.engine, steps) == []


def test_a_failing_step_leaves_nothing_behind_and_runs_again_next_time(database: Database) -> None:
    def broken(connection: sa.Connection) -> None:
        _create("half")(connection)
        raise RuntimeError("step failed halfway")

    with pytest.raises(RuntimeError, match="halfway"):
        apply(database.engine, [*STEPS, Step("9002_half", broken)])
    assert not has_table(database, "half")
    assert "9002_half" not in recorded(database)
    assert apply(database.engine, [*STEPS, Step("9002_half", _create("half"))]) == ["9002_half"]
    assert has_table(database, "half")


def test_step_names_must_be_unique(database: Database) -> None:
    with pytest.raises(ValueError, match="repeat"):
        apply(database.engine, [*STEPS, STEPS[0]])


def test_two_daemons_migrating_at_once_apply_each_step_exactly_once(database_settings: Settings) -> None:
    """Two engines (two daemons starting together) on one empty database: no step runs twice."""
    databases = [Database.from_settings(database_settings) for _ in range(2)]

    def slow(connection: sa.Connection) -> None:
        _create("once")(connection)
        connection.execute(sa.text("INSERT INTO once (n) VALUES (1)"))
        time.sleep(0.5)  # the other daemon arrives while this step is under way

    steps = [*STEPS, Step("9003_slow", slow), Step("9004_after", _create("after"))]
    start = threading.Barrier(2)
    results: list[list[str]] = []
    errors: list[BaseException] = []

    def migrate(database: Database) -> None:
        start.wait()
        try:
            results.append(apply(database.engine, steps))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=migrate, args=(d,)) for d in databases]
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(120)
        assert not errors, errors
        assert len(results) == 2
        applied = results[0] + results[1]
        assert sorted(applied) == sorted(step.name for step in steps)  # each once, by one of them
        assert databases[0].transaction(lambda c: c.scalar(sa.text("SELECT count(*) FROM once"))) == 1
    finally:
        for database in databases:
            database.close()


def test_storage_written_through_one_database_object_is_read_through_another(
    database_settings: Settings,
) -> None:
    first, second = (Database.from_settings(database_settings) for _ in range(2))
    try:
        first.migrate()
        asyncio.run(PluginStorage(first).set("t", "p", "k", b"\x00shared"))
        assert asyncio.run(PluginStorage(second).get("t", "p", "k")) == b"\x00shared"
    finally:
        first.close()
        second.close()


def test_a_missing_postgresql_database_is_created_as_upstream_does(
    postgres: PostgresServer, tmp_path: Path
) -> None:
    name = f"fresh_{os.urandom(4).hex()}"
    settings = Settings(state_dir=tmp_path, **postgres.env(name))
    databases = [Database.from_settings(settings) for _ in range(2)]
    try:
        # Two daemons finding it missing at once: one creates it, neither fails.
        with ThreadPoolExecutor(2) as pool:
            results = list(pool.map(lambda d: d.migrate(), databases))
        assert sorted(results[0] + results[1]) == sorted(step.name for step in STEPS)
        assert recorded(databases[1]) == sorted(step.name for step in STEPS)
    finally:
        for database in databases:
            database.close()


def test_run_keeps_the_event_loop_free_and_is_one_transaction(database: Database) -> None:
    storage = PluginStorage(database)

    async def body() -> None:
        released = threading.Event()

        def waits(connection: sa.Connection) -> int:
            assert released.wait(30), "the event loop was blocked while the query ran"
            return int(connection.scalar(sa.text("SELECT 1")))

        call = asyncio.create_task(database.run(waits))
        await asyncio.sleep(0.05)  # the call is under way in its thread; the loop still runs
        released.set()
        assert await call == 1

        def half(connection: sa.Connection) -> None:
            row = {"tenant_id": "t", "plugin_id": "p", "key": "k", "value": b"v"}
            connection.execute(plugin_storage.insert().values(**row))
            raise LookupError("after the insert")

        with pytest.raises(LookupError):
            await database.run(half)
        assert await storage.get("t", "p", "k") is None  # rolled back whole

    asyncio.run(body())


def test_a_database_gone_at_run_time_is_a_database_error(tmp_path: Path) -> None:
    settings = Settings(state_dir=tmp_path, DB_HOST="127.0.0.1", DB_PORT=free_port())
    database = Database.from_settings(settings)
    try:
        with pytest.raises(DatabaseError, match=r"cannot use the database .*Connection refused"):
            asyncio.run(database.run(lambda c: c.scalar(sa.text("SELECT 1"))))
    finally:
        database.close()


# Several daemon processes on one PostgreSQL database.


@pytest.fixture
def notes_plugins(sdk_plugins_installed: Path, tmp_path: Path) -> Path:
    plugins = tmp_path / "plugins"
    plugins.mkdir()
    (plugins / "notes").symlink_to(sdk_plugins_installed / "notes", target_is_directory=True)
    return plugins


def test_two_daemons_on_one_postgresql_share_plugin_storage(
    start: Callable[..., Daemon], notes_plugins: Path, postgres: PostgresServer
) -> None:
    """A note saved through one daemon is read and deleted through the other, per tenant."""
    env = postgres.env(postgres.create_database())
    one, two = start(notes_plugins, **env), start(notes_plugins, **env)
    one.wait_ready(NOTES)
    two.wait_ready(NOTES)
    assert variables(one, "tenant-a", "save_note", title="plan", body="buy milk") == {"saved": True}
    assert variables(two, "tenant-a", "read_note", title="plan") == {"found": True, "body": "buy milk"}
    assert variables(two, "tenant-b", "read_note", title="plan") == {"found": False, "body": ""}
    assert variables(two, "tenant-a", "delete_note", title="plan") == {"deleted": True}
    assert variables(one, "tenant-a", "read_note", title="plan") == {"found": False, "body": ""}
    # Neither daemon kept a SQLite file of its own.
    for n in (0, 1):
        assert not (notes_plugins.parent / f"state{n}" / "state.sqlite3").exists()


# Start-up errors: one line naming the problem, a failed exit, no traceback.


def serve(tmp_path: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    environ = {k: v for k, v in os.environ.items() if not k.startswith(("SERVER_", "PLUGIN", "DB_"))}
    plugins = tmp_path / "plugins"
    plugins.mkdir(exist_ok=True)
    argv = [CONSOLE_SCRIPT, "serve", "--state-dir", str(tmp_path / "state"), "--plugins", str(plugins)]
    environ.update({"SERVER_KEY": "k", "SERVER_PORT": str(free_port()), **env})
    return subprocess.run(argv, cwd=REPO, env=environ, capture_output=True, text=True, timeout=120)


def test_an_unreachable_postgresql_stops_the_start_with_one_clear_line(tmp_path: Path) -> None:
    port = free_port()  # nothing listens there
    out = serve(tmp_path, {"DB_HOST": "127.0.0.1", "DB_PORT": str(port), "DB_PASSWORD": "hunter2"})
    assert out.returncode != 0
    last = out.stderr.strip().splitlines()[-1]
    where = f"postgresql+psycopg://postgres:***@127.0.0.1:{port}/dify_plugin"
    assert last.startswith(f"plugin-daemon: cannot use the database {where}: ")
    assert "Connection refused" in last
    assert "Traceback" not in out.stderr and "hunter2" not in out.stderr + out.stdout
    assert "listening" not in out.stderr


def test_a_wrong_postgresql_password_stops_the_start_with_one_clear_line(
    tmp_path: Path, postgres: PostgresServer
) -> None:
    env = {**postgres.env(postgres.create_database()), "DB_PASSWORD": "not-" + PASSWORD}
    out = serve(tmp_path, env)
    assert out.returncode != 0
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith("plugin-daemon: cannot use the database postgresql+psycopg://")
    assert "password authentication failed" in last
    assert "Traceback" not in out.stderr and env["DB_PASSWORD"] not in out.stderr


def test_an_unusable_sqlite_location_stops_the_start_with_one_clear_line(tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.mkdir()
    (state / "state.sqlite3").mkdir()  # a directory where the database file should be
    out = serve(tmp_path, {})
    assert out.returncode != 0
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith(f"plugin-daemon: cannot open the database {state / 'state.sqlite3'}: ")
    assert "Traceback" not in out.stderr


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"DB_PORT": "abc"}, "invalid settings: DB_PORT: "),
        ({"DB_PORT": "0"}, "invalid settings: DB_PORT: "),
        ({"DB_TYPE": "mysql"}, "invalid settings: DB_TYPE: "),
        ({"DB_HOST": "127.0.0.1", "DB_SSL_MODE": "sometimes"}, "invalid settings: DB_SSL_MODE: "),
        ({"DB_TYPE": "postgresql"}, "invalid settings: DB_TYPE=postgresql needs DB_HOST"),
        ({"DB_MAX_OPEN_CONNS": "0"}, "invalid settings: DB_MAX_OPEN_CONNS: "),
    ],
)
def test_bad_database_settings_are_named(
    monkeypatch: pytest.MonkeyPatch, env: dict[str, str], message: str
) -> None:
    """The CLI's own settings check (run whole, as a process, below)."""
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(SystemExit) as exited:
        cli._settings(argparse.Namespace())
    assert message in str(exited.value.code)


def test_a_bad_database_setting_is_one_line_of_the_cli(tmp_path: Path) -> None:
    out = serve(tmp_path, {"DB_TYPE": "postgresql"})
    assert out.returncode != 0
    assert out.stderr.strip().splitlines()[-1] == (
        "plugin-daemon: invalid settings: DB_TYPE=postgresql needs DB_HOST (the PostgreSQL server's host)"
    )
    assert "Traceback" not in out.stderr


def test_help_lists_the_database_settings() -> None:
    out = subprocess.run([CONSOLE_SCRIPT, "serve", "--help"], capture_output=True, text=True, timeout=60)
    for name in ("DB_TYPE", "DB_HOST", "DB_PORT", "DB_USERNAME", "DB_PASSWORD", "DB_DATABASE", "DB_SSL_MODE"):
        assert name in out.stdout
