"""The daemon's database: SQLite in the state directory, or a PostgreSQL server shared by daemons.

Callers hand :meth:`Database.run` a function of one SQLAlchemy Core connection; it runs in a
worker thread inside one transaction, so no query ever blocks the event loop and a function
either commits whole or not at all. The drivers are the blocking ones (the standard library's
``sqlite3``, psycopg 3): SQLAlchemy's asyncio layer would only move the same threads out of sight.
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import logging
import os
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import sqlalchemy as sa
from sqlalchemy import event

if TYPE_CHECKING:
    from daemon.config import Settings

log = logging.getLogger("daemon.state")

T = TypeVar("T")

SQLITE_BUSY_TIMEOUT = 5.0  # seconds a writer waits for another's lock before it fails
CONNECT_TIMEOUT = 10  # seconds to reach a PostgreSQL server


class DatabaseError(Exception):
    """The database cannot be used: the message says which one and why (never the password)."""


class Database:
    """An engine, a bounded pool of worker threads for it, and the migrations runner."""

    def __init__(self, engine: sa.Engine, *, workers: int) -> None:
        self.engine = engine
        # PostgreSQL: the database and connection options to create a missing one from.
        self._maintenance: tuple[str, dict[str, Any]] | None = None
        self._executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="db")

    @classmethod
    def from_settings(cls, settings: Settings) -> Database:
        if settings.database_type == "postgresql":
            return cls.postgresql(settings)
        return cls.sqlite(settings.database_file)

    @classmethod
    def sqlite(cls, path: Path) -> Database:
        """A file for the daemon's user alone (SQLite gives its -wal and -shm files the same mode)."""
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            os.close(os.open(path, os.O_RDWR | os.O_CREAT, 0o600))
            os.chmod(path, 0o600)
        except OSError as exc:
            raise DatabaseError(f"cannot open the database {path}: {exc.strerror or exc}") from exc
        engine = sa.create_engine(
            sa.URL.create("sqlite", database=str(path)),
            connect_args={"timeout": SQLITE_BUSY_TIMEOUT, "check_same_thread": False},
            pool_size=4,
            max_overflow=4,
        )
        event.listen(engine, "connect", _sqlite_connect)
        event.listen(engine, "begin", _sqlite_begin)
        return cls(engine, workers=8)

    @classmethod
    def postgresql(cls, settings: Settings) -> Database:
        url = sa.URL.create(
            "postgresql+psycopg",
            username=settings.db_username,
            password=settings.db_password or None,
            host=settings.db_host,
            port=settings.db_port,
            database=settings.db_database,
        )
        connect_args = {"sslmode": settings.db_ssl_mode, "connect_timeout": CONNECT_TIMEOUT}
        # SQLAlchemy reads a pool size of 0 as "no limit": at least one connection stays open.
        idle = max(1, min(settings.db_max_idle_conns, settings.db_max_open_conns))
        engine = sa.create_engine(
            url,
            connect_args=connect_args,
            pool_size=idle,
            max_overflow=max(0, settings.db_max_open_conns - idle),
            pool_recycle=settings.db_conn_max_lifetime,
            pool_pre_ping=True,  # a restarted server costs one reconnect, not one failed call
        )
        database = cls(engine, workers=settings.db_max_open_conns)
        database._maintenance = (settings.db_default_database, connect_args)
        return database

    @property
    def dialect(self) -> str:
        """``sqlite`` or ``postgresql``."""
        return self.engine.dialect.name

    def describe(self) -> str:
        """Where the database is, for messages: the URL without its password."""
        return self.engine.url.render_as_string(hide_password=True)

    async def run(self, fn: Callable[[sa.Connection], T]) -> T:
        """``fn(connection)`` in a worker thread, in one transaction; its result, or its exception.

        A caller cancelled while ``fn`` runs does not stop it: the transaction still commits or
        rolls back on its own, so ``fn`` must leave the database consistent either way. A
        database that cannot be reached (or, SQLite, stays locked past the busy timeout) raises
        :class:`DatabaseError`; anything else ``fn`` raises passes through as it is.
        """
        loop = asyncio.get_running_loop()
        call = functools.partial(contextvars.copy_context().run, self.transaction, fn)
        return await loop.run_in_executor(self._executor, call)

    def transaction(self, fn: Callable[[sa.Connection], T]) -> T:
        """As :meth:`run`, in the calling thread (start-up, tests, the CLI)."""
        try:
            with self.engine.begin() as connection:
                return fn(connection)
        except sa.exc.OperationalError as exc:
            raise _unreachable(self, exc) from exc

    def migrate(self) -> list[str]:
        """Apply the steps not yet applied, in order; the names of those applied now."""
        from daemon.state.migrations import STEPS, apply

        try:
            try:
                return apply(self.engine, STEPS)
            except sa.exc.OperationalError:
                if not self._create_missing_database():
                    raise
            return apply(self.engine, STEPS)
        except sa.exc.OperationalError as exc:
            raise _unreachable(self, exc) from exc

    def _create_missing_database(self) -> bool:
        """PostgreSQL: make ``DB_DATABASE`` if the server lacks it, as upstream's daemon does.

        Asked through ``DB_DEFAULT_DATABASE`` (libpq's errors carry no code to tell a missing
        database from other failures). False when nothing was made: the first error stands.
        """
        if self._maintenance is None:
            return False
        maintenance, connect_args = self._maintenance
        name = str(self.engine.url.database)
        admin = sa.create_engine(
            self.engine.url.set(database=maintenance), connect_args=connect_args, poolclass=sa.NullPool
        )
        try:
            with admin.connect().execution_options(isolation_level="AUTOCOMMIT") as connection:
                query = sa.text("SELECT 1 FROM pg_database WHERE datname = :name")
                if connection.scalar(query, {"name": name}) is not None:
                    return True  # there after all (another daemon made it): worth one more try
                log.info("database: creating %s", name)
                quoted = connection.dialect.identifier_preparer.quote(name)
                try:
                    connection.exec_driver_sql(f"CREATE DATABASE {quoted}")
                except sa.exc.DBAPIError as exc:  # another daemon made it first
                    if _sqlstate(exc) not in MADE_BY_ANOTHER:
                        raise
                return True
        except sa.exc.DBAPIError as exc:
            log.warning("database: cannot create %s through %s: %s", name, maintenance, exc.orig)
            return False
        finally:
            admin.dispose()

    def close(self) -> None:
        self._executor.shutdown(wait=True)
        self.engine.dispose()


def upsert(
    connection: sa.Connection, table: sa.Table, values: Mapping[str, Any], keys: Sequence[str]
) -> None:
    """Insert ``values``, or update the row whose ``keys`` columns match (one statement, no race)."""
    if connection.dialect.name == "postgresql":
        from sqlalchemy.dialects.postgresql import insert
    else:
        from sqlalchemy.dialects.sqlite import insert  # type: ignore[assignment]
    statement = insert(table).values(**values)
    changed = {name: statement.excluded[name] for name in values if name not in keys}
    if changed:
        statement = statement.on_conflict_do_update(index_elements=list(keys), set_=changed)
    else:
        statement = statement.on_conflict_do_nothing(index_elements=list(keys))
    connection.execute(statement)


# duplicate_database, or unique_violation when two CREATE DATABASE statements cross
MADE_BY_ANOTHER = ("42P04", "23505")


def _sqlstate(exc: sa.exc.DBAPIError) -> str | None:
    return getattr(exc.orig, "sqlstate", None)


def _unreachable(database: Database, exc: sa.exc.DBAPIError) -> DatabaseError:
    reason = str(exc.orig).strip().splitlines()[0] if exc.orig is not None else str(exc)
    return DatabaseError(f"cannot use the database {database.describe()}: {reason}")


def _sqlite_connect(dbapi_connection: Any, _record: Any) -> None:
    # The driver's own transaction handling off: SQLAlchemy's "begin" event starts each one.
    dbapi_connection.isolation_level = None
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")  # readers never wait for the writer
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.close()


def _sqlite_begin(connection: sa.Connection) -> None:
    # IMMEDIATE: a transaction takes the write lock when it starts, so a read-then-write one
    # waits its turn instead of failing when another writer got there between the two.
    connection.exec_driver_sql("BEGIN IMMEDIATE")
