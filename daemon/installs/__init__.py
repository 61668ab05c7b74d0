"""Plugins installed per tenant through the API, as Dify's API server installs them.

- :mod:`daemon.installs.store`: the tables (kept packages, installations, install tasks) and
  every query on them.
- :mod:`daemon.installs.runtimes`: one runtime per unique identifier, shared by the tenants
  that installed it; the in-memory index dispatch reads; reconciling with the database.
- :mod:`daemon.installs.jobs`: install and upgrade tasks, run in the background.
- :mod:`daemon.installs.routes`: the ``management/install/*``, ``uninstall`` and
  ``installation/*`` routes.
"""
