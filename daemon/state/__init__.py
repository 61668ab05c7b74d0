"""The daemon's durable state: one database (SQLite by default, PostgreSQL from ``DB_*``).

- :mod:`daemon.state.database`: :class:`Database` (engine, ``run`` in a worker thread, one
  transaction per call), :func:`upsert`.
- :mod:`daemon.state.migrations`: the ordered, named schema steps and their runner.
- :mod:`daemon.state.storage`: plugin storage, the ``storage`` backwards call's table.

Tables are SQLAlchemy Core ``sa.Table`` objects kept in the module of the domain that owns them.
"""

from daemon.state.database import Database, DatabaseError, upsert
from daemon.state.storage import MAX_VALUE_BYTES, PluginStorage, StorageFull

__all__ = ["MAX_VALUE_BYTES", "Database", "DatabaseError", "PluginStorage", "StorageFull", "upsert"]
