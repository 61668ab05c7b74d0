"""Schema migrations: an ordered list of named steps, each applied once and recorded.

Why not Alembic: its revisions form a chain (each names the one before), so two features
developed side by side end as two heads that need a merge revision, and it needs a script
directory and an ``env.py``. Here a step is known by its name, not its place: two branches
that each append a step merge into a list where both run, in list order, on databases that
have neither, and a database that already has one gets only the other. Every step runs in
its own transaction together with the row that records it, under a lock that makes a second
daemon starting at the same moment wait and then find nothing left to do (a PostgreSQL
advisory lock; SQLite's write lock, taken by ``BEGIN IMMEDIATE``).

Adding a step: write a function of one connection that creates or alters what it needs from
definitions frozen inside it (never the live ``sa.Table`` objects of the domain modules, which
will have changed by the time an old database runs the step), and append one line to
:data:`STEPS`. Never edit or reorder a step once it is on main: add another.
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import sqlalchemy as sa

from daemon.endpoints.store import create_table as endpoints_table
from daemon.installs import store as installs_store

log = logging.getLogger("daemon.state")

# Any fixed 64-bit number: every daemon of this kind takes the same one.
ADVISORY_LOCK = zlib.crc32(b"plugin-daemon schema migrations")

_history = sa.MetaData()
APPLIED = sa.Table(
    "schema_migrations",
    _history,
    sa.Column("name", sa.String(200), primary_key=True),
    sa.Column("applied_at", sa.DateTime(timezone=True), nullable=False),
)


@dataclass(frozen=True)
class Step:
    name: str
    apply: Callable[[sa.Connection], None]


def _plugin_storage(connection: sa.Connection) -> None:
    metadata = sa.MetaData()
    sa.Table(
        "plugin_storage",
        metadata,
        sa.Column("tenant_id", sa.Text, primary_key=True),
        sa.Column("plugin_id", sa.Text, primary_key=True),
        sa.Column("key", sa.String(256), primary_key=True),
        sa.Column("value", sa.LargeBinary, nullable=False),
    )
    metadata.create_all(connection)


STEPS: list[Step] = [
    Step("0001_plugin_storage", _plugin_storage),
    Step("0002_endpoints", endpoints_table),
    Step("0002_plugin_installations", installs_store.migrate_v1),
]


def apply(engine: sa.Engine, steps: Sequence[Step]) -> list[str]:
    """Apply the steps of ``steps`` not yet recorded, in order; the names applied now."""
    names = [step.name for step in steps]
    if len(set(names)) != len(names):
        raise ValueError(f"migration step names repeat: {names}")
    done: list[str] = []
    with engine.connect() as connection:
        postgresql = connection.dialect.name == "postgresql"
        if postgresql:
            connection.execute(sa.select(sa.func.pg_advisory_lock(ADVISORY_LOCK)))
            connection.commit()
        try:
            with connection.begin():
                _history.create_all(connection)
            for step in steps:
                with connection.begin():
                    found = connection.execute(sa.select(APPLIED.c.name).where(APPLIED.c.name == step.name))
                    if found.first() is not None:
                        continue
                    log.info("database: applying migration %s", step.name)
                    step.apply(connection)
                    now = datetime.datetime.now(datetime.UTC)
                    connection.execute(APPLIED.insert().values(name=step.name, applied_at=now))
                done.append(step.name)
            with connection.begin():
                recorded = set(connection.scalars(sa.select(APPLIED.c.name)))
        finally:
            if postgresql:
                # A broken connection lost the lock with its session; nothing else to release.
                with contextlib.suppress(sa.exc.DBAPIError):
                    connection.rollback()
                    connection.execute(sa.select(sa.func.pg_advisory_unlock(ADVISORY_LOCK)))
                    connection.commit()
    unknown = sorted(recorded - set(names))
    if unknown:
        log.warning("database: migrations applied by a newer daemon, unknown here: %s", ", ".join(unknown))
    return done
